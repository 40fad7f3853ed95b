"""The `asbnn` command line: train, eval, compare, predict, reproduce, quickstart, download.

Every error of ours (bad config, missing data, corrupt checkpoint) prints as one line and exits 2,
and so does every bad flag: each is checked when the command line is read, before any work.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

from .config import PRESETS, make_config, parse_overrides
from .errors import AsbnnError, ConfigError

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


def resolve_config(name: str | None) -> Path | None:
    """A config path, or the name of one shipped with the package (`table1-cifar10-resnet20-as`)."""
    if name is None:
        return None
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = PACKAGE_CONFIGS / f"{name}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml")))
    raise AsbnnError(f"no config file '{name}' and no shipped config of that name; shipped: {known}")


def default_run_dir(cfg) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.model}-{cfg.method}-s{cfg.seed}"


def cmd_train(args: argparse.Namespace) -> None:
    from .distributed import is_main_process
    from .results import evaluate_run
    from .train import train

    if args.config is not None and "=" in args.config:  # `asbnn train epochs=3`: no config file given
        args.overrides, args.config = [args.config, *args.overrides], None
    if args.config is None and not args.overrides:  # all defaults: days of ResNet-20 on CIFAR-10, surely a mistake
        raise ConfigError("name a config file or a shipped config (e.g. asbnn train quickstart), or give key=value "
                          "settings; for the paper's full CIFAR-10 run: asbnn train table1-cifar10-resnet20-as")
    overrides = parse_overrides(args.overrides)
    for key in ("data_root", "device"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = make_config(resolve_config(args.config), overrides, preset=args.preset)
    out = Path(args.out) if args.out else default_run_dir(cfg)
    main_process = is_main_process()  # under torchrun, rank 0 reports and evaluates
    if main_process:
        print(f"training {cfg.model} on {cfg.dataset} ({cfg.method}) into {out}")
    train(cfg, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if not args.no_eval and main_process:
        evaluate_run(out, num_samples=cfg.eval_samples)  # prints the table even with --quiet


def cmd_eval(args: argparse.Namespace) -> None:
    from .results import evaluate_ensemble, evaluate_run

    extras = dict(seed=args.seed, ood=args.ood, data=args.data, data_root=args.data_root, out=args.out,
                  save_probs=args.save_probs, device=args.device, amp=args.amp, calibrate=args.calibrate,
                  shift=args.shift, shift_samples=args.shift_samples, shift_subset=args.shift_subset)
    if args.ensemble:
        if args.bn_recalibrate or args.all_test_images:
            raise AsbnnError("--bn-recalibrate and --all-test-images are for one run, not for --ensemble")
        evaluate_ensemble(args.run, **extras)
    elif len(args.run) > 1:
        raise AsbnnError(f"{len(args.run)} runs given: evaluate them one at a time, or as one deep ensemble "
                         "with --ensemble")
    else:
        evaluate_run(args.run[0], num_samples=args.samples, mode=args.mode, bn_recalibrate=args.bn_recalibrate,
                     all_test_images=args.all_test_images, **extras)


def cmd_compare(args: argparse.Namespace) -> None:
    from .results import compare_runs

    compare_runs(args.runs, out=args.out, csv_path=args.csv)


def cmd_predict(args: argparse.Namespace) -> None:
    import json

    from .predict import format_predictions, predict_files

    predictions = predict_files(args.model, args.images, num_samples=args.samples, seed=args.seed, top=args.top,
                                device=args.device)
    if args.json:
        print(json.dumps({"model": args.model, "samples": args.samples, "seed": args.seed,
                          "predictions": [p.to_dict() for p in predictions]}, indent=1))
    else:
        print(format_predictions(predictions))


def cmd_quickstart(args: argparse.Namespace) -> None:
    from .experiments.quickstart import quickstart

    quickstart(out=Path(args.out), data_root=args.data_root, quiet=args.quiet)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from .experiments.reproduce import reproduce

    path = reproduce(args.tables, args.scale, args.out, seeds=args.seeds, data_root=args.data_root,
                     device=args.device, progress=not args.quiet, report_only=args.report_only)
    print(f"report: {path}")


def cmd_download(args: argparse.Namespace) -> None:
    from .data import download_dataset

    print(download_dataset(args.dataset, args.data_root))


# ---------------------------------------------------------------- flag values, checked as they are read


def count(text: str) -> int:
    """An integer > 0 (--samples, --top, --seeds)."""
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}")
    return int(text)


def seed(text: str) -> int:
    """A seed as `TrainConfig.seed` takes it: what torch and numpy's SeedSequence both accept."""
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}")
    return int(text)


def device(text: str) -> str:
    """auto, cpu, cuda or cuda:N, checked to exist on this machine."""
    from .hardware import resolve_device

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")
    try:
        resolve_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def folder(text: str) -> str:
    """A folder to write into: absent (it is made) or a folder, not a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def existing_folder(text: str) -> str:
    """A folder to read from (--data-root)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return text


def new_file(text: str) -> str:
    """A file to write (--csv): not a folder, in a folder that exists."""
    path = Path(text)
    if path.is_dir() or not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write a file at {text}: " +
                                         ("it is a folder" if path.is_dir() else "its folder does not exist"))
    return text


def dataset(text: str) -> str:
    """A registered data set name or the path of an image folder / archive."""
    from .data import list_datasets

    if text not in list_datasets() and not Path(text).exists():
        raise argparse.ArgumentTypeError(f"unknown data set {text!r}; valid: {', '.join(list_datasets())}, "
                                         "or the path of an image folder / .tar.gz")
    return text


class Parser(argparse.ArgumentParser):
    """argparse, with bad flags reported like every other bad input: one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"asbnn: error: {message} (see {self.prog} --help)\n")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like `parse_args`, but `train`'s key=value settings may also come after its options."""
    args, extra = parser.parse_known_args(argv)
    settings = [item for item in extra if not item.startswith("-")]
    if extra and (args.command != "train" or len(settings) < len(extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if settings:
        args.overrides += settings
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="asbnn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a network (deterministic, VI or VI + AS)")
    p.add_argument("config", nargs="?", help="YAML config file or shipped config name")
    p.add_argument("overrides", nargs="*", help="key=value settings that override the config")
    p.add_argument("--out", type=folder, help="run folder (default runs/<dataset>-<model>-<method>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out: delete its checkpoints, log and evaluations first")
    p.add_argument("--preset", choices=sorted(PRESETS), help="'paper' = the authors' code, traps included")
    p.add_argument("--data-root", type=existing_folder, help="data folder (else $ASBNN_DATA, else ~/.cache/asbnn/data)")
    p.add_argument("--device", type=device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-eval", action="store_true", help="skip the sampled-model evaluation at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate K sampled models of a run, or a deep ensemble of runs")
    p.add_argument("run", nargs="+", help="run folder or checkpoint file (several with --ensemble)")
    p.add_argument("--ensemble", action="store_true",
                   help="the runs (deterministic, different seeds) are the members of one deep ensemble; "
                        "results in --out (default runs/ensemble-<dataset>-<model>-x<M>)/eval")
    p.add_argument("--samples", type=count, default=100, help="number of sampled models K")
    p.add_argument("--seed", type=seed, default=0, help="seed of the sampled models")
    p.add_argument("--ood", type=dataset, action="append", default=None,
                   help="out-of-distribution data set (repeatable)")
    p.add_argument("--data", type=dataset,
                   help="where the run's data set is now, if it moved (an image folder or archive)")
    p.add_argument("--data-root", type=existing_folder)
    p.add_argument("--out", type=folder,
                   help="output folder (default RUN/eval, RUN/eval-recalibrated with --bn-recalibrate, "
                        "RUN/eval-all-test(-recalibrated) with --all-test-images)")
    p.add_argument("--mode", choices=["auto", "batched", "loop"], default="auto")
    p.add_argument("--save-probs", action="store_true",
                   help="also save per-sample probabilities (float16 npz) of the test, OOD, hold-out and shifted sets")
    p.add_argument("--calibrate", action="store_true",
                   help="temperature scaling fitted on a fixed 10%% (at most 5,000) of the training images")
    p.add_argument("--shift", action="store_true",
                   help="accuracy, NLL and ECE on the test images under 8 corruptions x 5 severities")
    p.add_argument("--shift-samples", type=count, default=10, help="sampled models (or members) on shifted data")
    p.add_argument("--shift-subset", type=count, default=1000, help="test images corrupted for --shift")
    p.add_argument("--device", type=device, default="auto")
    p.add_argument("--amp", action="store_true",
                   help="fast evaluation: bf16 where measured faster with near-ties recomputed in fp32, BatchNorm "
                        "folded, NHWC batches (~3x faster on AMX CPUs; sampled accuracies as in fp32, ensemble "
                        "metrics within ~0.15 point; docs/benchmarks.md)")
    p.add_argument("--bn-recalibrate", action="store_true",
                   help="re-estimate BatchNorm statistics for each sampled network from 2,000 fixed training images")
    p.add_argument("--all-test-images", action="store_true",
                   help="evaluate on the whole test set (and whole OOD sets), not the run's test_subset")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="put several evaluated runs side by side")
    p.add_argument("runs", nargs="+", help="run folders (evaluated)")
    p.add_argument("--out", type=folder, default="runs/compare", help="output folder")
    p.add_argument("--csv", type=new_file, help="also write the table, every number, as CSV to this file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="classify image files, with the ensemble's uncertainty")
    p.add_argument("model", help="run folder, checkpoint or .safetensors model file")
    p.add_argument("images", nargs="+", help="PNG/JPEG files or folders (searched recursively)")
    p.add_argument("--samples", type=count, default=30, help="number of sampled models K")
    p.add_argument("--seed", type=seed, default=0, help="seed of the sampled models")
    p.add_argument("--top", type=count, default=3, help="classes shown per image")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.add_argument("--device", type=device, default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("quickstart", help="VI vs VI + AS on Fashion-MNIST in minutes on a CPU")
    p.add_argument("--out", type=folder, default="runs/quickstart")
    p.add_argument("--data-root", type=existing_folder)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("reproduce", help="the paper's tables and figures at smoke / cpu / full scale")
    p.add_argument("tables", nargs="+",
                   help="table1 table2 table3 lambda curves cheap, all (those six), or map (the regime map)")
    p.add_argument("--scale", default="cpu",
                   help="smoke, cpu, mid (CIFAR-10 Table 2 on a CPU), mid-long (mid from a 100-epoch start), "
                        "mid-narrow (mid's fine-tunes at initial sigma 0.01), mid-scratch (CIFAR-10 Table 1 on a CPU) "
                        "or full")
    p.add_argument("--seeds", type=count, help="number of seeds (default: the scale's)")
    p.add_argument("--out", type=folder, default="runs/reproduce", help="results folder, shared by all workers")
    p.add_argument("--data-root", type=existing_folder)
    p.add_argument("--device", type=device, default="auto")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the report from finished runs")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("download", help="download an official data set archive (checksum verified)")
    p.add_argument("dataset", choices=["cifar10", "cifar100"])
    p.add_argument("--data-root", type=folder)
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(build_parser(), argv)
    except SystemExit as exit:  # a bad flag (one line already printed), or --help
        return int(exit.code or 0)
    try:
        args.func(args)
    except AsbnnError as err:
        print(f"asbnn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asbnn: interrupted; a training run continues with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
