"""The files of an evaluation: `eval.json` with every number, `eval.md`, plots, comparisons and CSV.

The numbers come from `evaluate`; this module only runs it over a run folder and writes them down.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import metrics, report
from .bn_recalibration import Recalibration
from .build import build_test_loader, check_images, subset
from .calibration import calibrated_numbers, holdout_indices
from .config import TrainConfig
from .data import EVAL_BATCH, ArrayDataset, DatasetInfo, DeviceLoader, eval_loader, load_dataset, looks_like_path
from .ensembles import check_members, ensemble_predictions
from .errors import ConfigError, DataError
from .evaluate import Mode, Predictions, choose_mode, ood_summary, sampled_predictions, summarize, timed
from .fileio import atomic_write_text, read_jsonl
from .hardware import Workload, choose_precision, resolve_device
from .runfolder import LOG, checkpoint_path, load_run, tensorboard_writer
from .shift import evaluate_shift


def evaluate_run(
    run: str | Path,
    num_samples: int = 100,
    seed: int = 0,
    *,
    ood: list[str] | None = None,
    data: str | None = None,
    data_root: str | None = None,
    out: str | Path | None = None,
    mode: Mode | Literal["auto"] = "auto",
    save_probs: bool = False,
    device: str = "auto",
    progress: bool = True,
    amp: bool = False,
    bn_recalibrate: bool | Recalibration = False,
    all_test_images: bool = False,
    calibrate: bool = False,
    shift: bool = False,
    shift_samples: int = 10,
    shift_subset: int = 1000,
) -> dict[str, Any]:
    """Evaluate a run folder: `eval.json` with every number, `eval.md` and plots in RUN/eval.

    `data` is where the run's data set is now, if it moved (the network, classes and normalisation
    come from the checkpoint, not from the data).
    `amp` asks for the fast evaluation: bf16 forward passes where `hardware.choose_precision`
    measures that they pay (as a training run with `amp: auto`), BatchNorm folded into the
    convolutions and NHWC batches, near-ties recomputed in fp32 (`evaluate`): 2.9x faster than the
    exact fp32 evaluation on a weak ResNet-20 (31 % of its pairs near-ties), with every sampled
    network's accuracy and the posterior mean's exact, the ensemble's accuracy within 0.05 point and
    its ECE within 0.14 point (docs/benchmarks.md).
    `bn_recalibrate` (True or a `Recalibration`) evaluates every sampled network with BatchNorm
    statistics re-estimated at its own eps from a fixed set of training images; its results go
    to RUN/eval-recalibrated unless `out` says otherwise. `all_test_images` evaluates on the whole
    test set (and whole OOD sets) where the run was trained with a `test_subset`: its results go to
    RUN/eval-all-test(-recalibrated), beside the subset's. `calibrate` adds temperature scaling
    fitted on a hold-out of training images; `shift` the corrupted test sets (`shift_samples`
    sampled networks on `shift_subset` test images). An MC-dropout run's sampled networks are
    dropout masks (`dropout.MCDropout`)."""

    if num_samples <= 0:
        raise ConfigError(f"--samples must be > 0, got {num_samples}")
    dev = resolve_device(device)
    net, cfg, info = load_run(run, dev)
    fast, amp = amp, eval_in_bf16(dev, amp, cfg, info, net, channels_last=True)  # NHWC: as the fast evaluation runs
    locate_data(cfg, data, data_root)
    if all_test_images:
        cfg.test_subset = None  # recorded so in eval.json's config
    run_dir = checkpoint_path(run).parent
    recal = Recalibration() if bn_recalibrate is True else bn_recalibrate or None
    out = Path(out) if out else run_dir / eval_folder(recalibrated=bool(recal), all_test_images=all_test_images)
    mode = choose_mode(dev) if mode == "auto" else mode
    recal_batches = recalibration_batches(cfg, info, recal, dev) if recal else None
    if recal_batches is not None:
        mode = "loop"

    def predict(loader: DeviceLoader, k: int = num_samples, keep_probs: bool = False) -> Predictions:
        return sampled_predictions(net, loader, num_samples=k, seed=seed, mode=mode, keep_probs=keep_probs,
                                   amp=amp, fast=fast, recalibration=recal_batches)

    protocol = ({"batchnorm": "recalibrated per sampled network", "recalibration": dataclasses.asdict(recal),
                 "recalibration_images": sum(len(x) for x in recal_batches)}
                if recal else {"batchnorm": "running statistics"})
    head = {"run": str(run_dir), "config": cfg.to_dict(), "protocol": protocol}
    result = _evaluate(predict, head, cfg, info, dev, out, label=run_label(cfg), log=read_jsonl(run_dir / LOG),
                       mode=mode, precision="bf16" if amp else "fp32", fast=fast, seed=seed, ood=ood, save_probs=save_probs,
                       calibrate=calibrate, shift=shift, shift_samples=shift_samples, shift_subset=shift_subset,
                       progress=progress)
    if cfg.tensorboard:
        with tensorboard_writer(run_dir) as writer:
            writer.add_histogram("sampled_model_accuracy", torch.tensor(result["per_sample_accuracy"]), cfg.epochs)
            writer.add_scalar("ensemble_accuracy", result["ensemble"]["accuracy"], cfg.epochs)
    return result


def eval_folder(*, recalibrated: bool = False, all_test_images: bool = False) -> str:
    """The default folder of an evaluation inside its run: eval, eval-recalibrated, eval-all-test, ..."""
    return "eval" + ("-all-test" if all_test_images else "") + ("-recalibrated" if recalibrated else "")


def evaluate_ensemble(
    runs: list[str | Path],
    *,
    out: str | Path | None = None,
    seed: int = 0,
    ood: list[str] | None = None,
    data: str | None = None,
    data_root: str | None = None,
    save_probs: bool = False,
    device: str = "auto",
    progress: bool = True,
    amp: bool = False,
    calibrate: bool = False,
    shift: bool = False,
    shift_samples: int = 10,
    shift_subset: int = 1000,
) -> dict[str, Any]:
    """Evaluate a deep ensemble of deterministic runs like a Bayesian run (`ensembles`), into
    OUT/eval (default runs/ensemble-<dataset>-<model>-x<M>), so `compare` can take OUT beside runs.
    On shifted data the first `shift_samples` members run."""
    dev = resolve_device(device)
    loaded = [load_run(run, dev) for run in runs]
    nets, cfgs = [n for n, _, _ in loaded], [c for _, c, _ in loaded]
    names = [str(checkpoint_path(run).parent) for run in runs]
    check_members(cfgs, names)
    cfg, info = cfgs[0], loaded[0][2]
    fast, amp = amp, eval_in_bf16(dev, amp, cfg, info, nets[0], channels_last=cfg.channels_last)
    locate_data(cfg, data, data_root)
    out_dir = Path(out) if out else Path("runs") / f"ensemble-{cfg.dataset}-{cfg.model}-x{len(runs)}"

    def predict(loader: DeviceLoader, k: int = len(nets), keep_probs: bool = False) -> Predictions:
        return ensemble_predictions(nets[:k], loader, keep_probs=keep_probs, amp=amp)

    head = {"run": str(out_dir), "method": "deep_ensemble", "members": names, "config": cfg.to_dict(),
            "protocol": {"batchnorm": "running statistics", "ensemble": f"{len(nets)} deterministic runs"}}
    return _evaluate(predict, head, cfg, info, dev, out_dir / "eval", label=result_label(head), log=[],
                     mode="members", precision="bf16" if amp else "fp32", fast=fast, seed=seed, ood=ood, save_probs=save_probs,
                     calibrate=calibrate, shift=shift, shift_samples=shift_samples, shift_subset=shift_subset,
                     progress=progress)


def eval_in_bf16(dev: torch.device, amp: bool, cfg: TrainConfig, info: DatasetInfo, net: torch.nn.Module, *,
                 channels_last: bool) -> bool:
    """Whether an evaluation asking for `amp` runs its forward passes in bf16: the training policy
    (`hardware.choose_precision`, as `amp: auto`) measured on the evaluation's forward pass."""
    workload = Workload(cfg.model, (info.channels, info.image_size, info.image_size), EVAL_BATCH, cfg.bayesian,
                        "eval", channels_last)
    return choose_precision(dev, "auto" if amp else False, workload, net) == "bf16"


def _evaluate(predict: Callable[..., Predictions], head: dict[str, Any], cfg: TrainConfig, info: DatasetInfo,
              dev: torch.device, out: Path, *, label: str, log: list[dict], mode: str, precision: str, fast: bool,
              seed: int, ood: list[str] | None, save_probs: bool, calibrate: bool, shift: bool, shift_samples: int,
              shift_subset: int, progress: bool) -> dict[str, Any]:
    """What `evaluate_run` and `evaluate_ensemble` share: every number and file of an evaluation,
    given `predict(loader, k=K, keep_probs=False)`, the networks' Predictions on a loader."""
    if shift and (shift_samples <= 0 or shift_subset <= 0):
        raise ConfigError(f"--shift-samples and --shift-subset must be > 0, got {shift_samples} and {shift_subset}")
    test = build_test_loader(cfg, info, dev)
    ood_loaders = {name: _ood_loader(name, cfg, info, dev) for name in ood or []}  # all read before any work
    out.mkdir(parents=True, exist_ok=True)
    pred, seconds = timed(lambda: predict(test, keep_probs=save_probs))
    result = {**head, "eval_seed": seed, **summarize(pred),  # eval_seed: which eps the sampled networks are
              "timing": {"seconds": seconds, "mode": mode, "device": str(dev), "precision": precision, "fast": fast}}
    kept: dict[str, Predictions] = {"probs": pred}
    ood_scores = {}
    for name, loader in ood_loaders.items():
        ood_pred = predict(loader, keep_probs=save_probs)
        result.setdefault("ood", {})[name] = ood_summary(pred, ood_pred)
        ood_scores[name] = {s: (getattr(pred, s).cpu(), getattr(ood_pred, s).cpu()) for s in ("total", "epistemic")}
        kept[f"ood-{name}"] = ood_pred
    if calibrate:
        holdout, indices, n_train = calibration_holdout(cfg, info, dev)
        holdout_pred = predict(holdout, keep_probs=save_probs)
        result["calibration"] = {
            **calibrated_numbers(holdout_pred.ensemble_probs, holdout_pred.labels, pred.ensemble_probs, pred.labels),
            "holdout": {"images": len(indices), "training_images": n_train, "seed": 0,
                        "note": "a fixed seeded subset of the training images, which the network was trained on; "
                                "the test set is never used to fit T"}}
        kept["calibration"] = holdout_pred
    if shift:
        test = subset(load_dataset(cfg.dataset, "test", cfg.data_root), cfg.test_subset)
        k = min(shift_samples, len(pred.sample_correct))
        result["shift"], shifted = evaluate_shift(lambda loader: predict(loader, k=k, keep_probs=save_probs), test,
                                                  info, size=shift_subset, seed=seed, device=dev,
                                                  channels_last=cfg.channels_last)
        kept.update({f"shift-{key}": p for key, p in shifted.items()})
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    if save_probs:
        for name, p in kept.items():
            save_sample_probs(p, out / f"{name}.npz", ood=name.startswith("ood-"))
    report.plot_sample_accuracies({label: [100 * a for a in result["per_sample_accuracy"]]}, out / "sample_accuracies.png")
    report.plot_reliability({label: {**metrics.calibration_bins(pred.ensemble_probs, pred.labels),
                                     "ece": result["ensemble"]["ece"]}}, out / "reliability.png")
    correct = (pred.ensemble_probs.argmax(1) == pred.labels).float()
    curves = {f"{label}, by {name}": metrics.risk_coverage(correct, s)
              for name, s in (("total", pred.total), ("epistemic", pred.epistemic),
                              ("max prob", -pred.ensemble_probs.max(1).values))}
    report.plot_risk_coverage(curves, out / "risk_coverage.png")
    for name, scores in ood_scores.items():
        report.plot_ood_scores(scores, out / f"ood_{name}.png")
    if shift:
        s = result["shift"]
        report.plot_shift({c: [s["clean"]["accuracy"], *(v["accuracy"] for v in by.values())]
                           for c, by in s["corruptions"].items()}, out / "shift.png")
    if log:
        report.plot_training_curves({label: log}, out / "training_curves.png")
    atomic_write_text(out / "eval.md", markdown_summary({label: result}))
    if progress:
        print(markdown_summary({label: result}))
        print(f"\n{len(pred.sample_correct)} sampled models in {seconds:.1f} s ({mode}); results in {out}")
    return result


def locate_data(cfg: TrainConfig, data: str | None, data_root: str | None) -> None:
    """Point a trained run's `cfg` at where its data is now: `data` for a data set that moved,
    `data_root` for the folder of the registered ones."""
    if data_root is not None:
        cfg.data_root = data_root
    if data is not None:
        cfg.dataset = data
    elif looks_like_path(cfg.dataset) and not Path(cfg.dataset).expanduser().exists():
        raise DataError(f"{cfg.dataset}, the data set this run was trained on, is not there any more; "
                        "pass where it is now with --data PATH")


def _ood_loader(name: str, cfg: TrainConfig, info: DatasetInfo, dev: torch.device) -> DeviceLoader:
    """The test split of OOD set `name`, its training split never read (labels are placeholders:
    only uncertainty scores are used)."""
    ood_data = subset(load_dataset(name, "test", cfg.data_root), cfg.test_subset)
    check_images(f"OOD set {name}", ood_data, info)
    ood_data = ArrayDataset(ood_data.images, np.zeros_like(ood_data.labels), ood_data.classes)
    return eval_loader(ood_data, info.mean, info.std, device=dev, channels_last=cfg.channels_last)


def calibration_holdout(cfg: TrainConfig, info: DatasetInfo, dev: torch.device) -> tuple[DeviceLoader, np.ndarray, int]:
    """The training images temperature scaling is fitted on (`calibration.holdout_indices`), as an
    evaluation loader, with their indices into the run's training set and that set's size."""
    train = subset(load_dataset(cfg.dataset, "train", cfg.data_root), cfg.train_subset)
    indices = holdout_indices(len(train.labels))
    held = ArrayDataset(train.images[indices], train.labels[indices], train.classes)
    return eval_loader(held, info.mean, info.std, device=dev, channels_last=cfg.channels_last), indices, len(train.labels)


def recalibration_batches(cfg: TrainConfig, info: DatasetInfo, recal: Recalibration,
                          device: torch.device) -> list[Tensor]:
    """The fixed recalibration images of a run's training set, normalised, in batches on `device`."""
    train = recal.images(subset(load_dataset(cfg.dataset, "train", cfg.data_root), cfg.train_subset))
    loader = DeviceLoader(train, min(recal.batch_size, len(train)), train=False, mean=info.mean, std=info.std,
                          augment=False, device=device, channels_last=cfg.channels_last)
    return [x for x, _ in loader.batches()]


def run_label(cfg: Any) -> str:
    """A short name for a run in tables and legends: 'VI', 'VI + AS (lambda 0.8)', ..."""
    name = {"deterministic": "deterministic", "vi": "VI", "as": "VI + AS", "mc_dropout": "MC dropout"}[cfg.method]
    if cfg.method == "as" and cfg.as_lambda != 0.8:
        name += f" (lambda {cfg.as_lambda:g})"
    if cfg.method == "as" and cfg.as_layers == "normalised":
        name += " (normalised layers)"
    if cfg.method == "mc_dropout":
        name += f" (p {cfg.dropout:g})"
    return f"{name} s{cfg.seed}"


def result_label(result: dict[str, Any]) -> str:
    """`run_label` of an eval.json's run; 'deep ensemble x5' for an ensemble."""
    if result.get("method") == "deep_ensemble":
        return f"deep ensemble x{len(result['members'])}"
    return run_label(TrainConfig(**result["config"]))


def markdown_summary(results: dict[str, dict[str, Any]]) -> str:
    """The paper's columns (lowest / highest / ensemble of K sampled models) and the rest, in %."""
    headers = ["run", "lowest", "highest", "mean ± std", "ensemble", "post. mean",
               "ens. NLL", "ECE", "Brier", "AURC", "sel. acc 80%"]
    rows = []
    for label, r in results.items():
        s, e = r["sampled"], r["ensemble"]
        rows.append([
            label, 100 * s["lowest"], 100 * s["highest"], f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}",
            100 * e["accuracy"], 100 * r.get("posterior_mean", {}).get("accuracy", float("nan")),
            f"{e['nll']:.3f}", f"{100 * e['ece']:.2f}", f"{e['brier']:.3f}", f"{100 * r['aurc']['total']:.2f}",
            100 * r["selective"]["total"]["0.8"],
        ])
    text = report.markdown_table(headers, rows)
    text += "\n\nAccuracies in %, over K sampled models each held fixed over the whole test set; "
    text += "ECE with 15 equal-width bins; AURC and selective accuracy rank inputs by total uncertainty.\n"
    ood_rows = [
        [label, name, score, 100 * v["auroc"], 100 * v["aupr"], 100 * v.get("aupr_in", float("nan")), 100 * v["fpr95"]]
        for label, r in results.items() for name, by in r.get("ood", {}).items() for score, v in by.items()
    ]
    if ood_rows:
        text += "\n" + report.markdown_table(["run", "OOD set", "score", "AUROC", "AUPR-out", "AUPR-in", "FPR@95"],
                                             ood_rows)
        text += "\n\nAUPR-out counts OOD inputs as positives, AUPR-in the in-distribution inputs; energy and max logit " \
                "are those of the mean of the K sampled logits.\n"
    cal_rows = [[label, f"{c['temperature']:.3f}", f"{c['before']['nll']:.3f}", f"{c['after']['nll']:.3f}",
                 100 * c["before"]["ece"], 100 * c["after"]["ece"], c["holdout"]["images"]]
                for label, r in results.items() if (c := r.get("calibration"))]
    if cal_rows:
        text += "\n" + report.markdown_table(["run", "T", "NLL before", "NLL after", "ECE before", "ECE after",
                                              "hold-out images"], cal_rows)
        text += "\n\nTemperature scaling fitted on a fixed hold-out of training images (seen in training), " \
                "applied to the ensemble's probabilities on the test set.\n"
    shift_rows = [[label, r["shift"]["num_samples"], 100 * r["shift"]["clean"]["accuracy"],
                   *(100 * v["accuracy"] for v in r["shift"]["mean_by_severity"].values()),
                   f"{r['shift']['mean_by_severity']['5']['nll']:.3f}", 100 * r["shift"]["mean_by_severity"]["5"]["ece"]]
                  for label, r in results.items() if "shift" in r]
    if shift_rows:
        text += "\n" + report.markdown_table(["run", "K", "clean", "sev. 1", "sev. 2", "sev. 3", "sev. 4", "sev. 5",
                                              "NLL sev. 5", "ECE sev. 5"], shift_rows)
        text += "\n\nEnsemble accuracy (%) on corrupted test images, averaged over the corruptions " \
                "(eval.json has each corruption and severity).\n"
    return text


def compare_runs(runs: list[str | Path], out: str | Path = "runs/compare", csv_path: str | Path | None = None) -> str:
    """Several evaluated runs side by side: one table (compare.md) and one set of plots."""

    results, logs = {}, {}
    for run in runs:
        path = Path(run) / "eval" / "eval.json"
        if not path.is_file():
            raise ConfigError(f"{run} has no evaluation ({path}); run `asbnn eval {run}` first")
        result = json.loads(path.read_text())
        label = result_label(result)
        if label in results:
            label = f"{label} ({Path(run).name})"
        results[label] = result
        logs[label] = read_jsonl(Path(run) / LOG)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_summary(results)
    atomic_write_text(out / "compare.md", text)
    if csv_path is not None:
        atomic_write_text(csv_path, results_csv(results))
    report.plot_sample_accuracies(
        {k: [100 * a for a in r["per_sample_accuracy"]] for k, r in results.items()}, out / "sample_accuracies.png")
    if any(logs.values()):
        report.plot_training_curves({k: v for k, v in logs.items() if v}, out / "training_curves.png")
    print(text)
    return text


def save_sample_probs(pred: Predictions, path: str | Path, *, ood: bool = False) -> None:
    """Per-sample probabilities `probs` [K, N, C] (float16, compressed), `labels`, the mean logits
    (float32, for the energy and max-logit scores), the posterior mean's probabilities where there
    is one, and for an OOD set the flags `ood` (all true): every number of eval.json can be recomputed."""
    if pred.sample_probs is None:
        raise ValueError("predict(..., keep_probs=True) is needed to save the per-sample probabilities")
    arrays = {"probs": pred.sample_probs.numpy(), "labels": pred.labels.cpu().numpy(),
              "ood": np.full(len(pred.labels), ood)}
    if pred.mean_logits is not None:
        arrays["mean_logits"] = pred.mean_logits.cpu().numpy()
    if pred.mean_probs is not None:
        arrays["mean_probs"] = pred.mean_probs.cpu().numpy()
    np.savez_compressed(path, **arrays)


def results_csv(results: dict[str, dict[str, Any]]) -> str:
    """Evaluation results (`eval.json` contents by run label) as CSV: one row per run.

    Columns are the numbers of eval.json flattened to dotted names (`sampled.lowest`,
    `ensemble.ece`, `ood.<set>.epistemic.auroc`, ...), accuracies as fractions; per-sample lists,
    the config and timings are left out. A number a run lacks (e.g. no OOD set) is left empty.
    """
    rows = {label: dict(_flatten(result)) for label, result in results.items()}
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", *columns])
    for label, row in rows.items():
        writer.writerow([label, *(row.get(c, "") for c in columns)])
    return out.getvalue()


def _flatten(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        if not prefix and key in ("config", "timing"):
            continue
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value
