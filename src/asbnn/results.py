"""The files of an evaluation: `eval.json` with every number, `eval.md`, plots, comparisons and CSV.

The numbers come from `evaluate`; this module only runs it over a run folder and writes them down.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import metrics, report
from .bn_recalibration import Recalibration
from .build import build_test_loader, check_images, subset
from .config import TrainConfig
from .data import ArrayDataset, DatasetInfo, DeviceLoader, eval_loader, load_dataset, looks_like_path
from .errors import ConfigError, DataError
from .evaluate import Mode, Predictions, choose_mode, ood_summary, sampled_predictions, summarize, timed_predictions
from .fileio import atomic_write_text, read_jsonl
from .hardware import resolve_device, use_amp
from .runfolder import LOG, checkpoint_path, load_run, tensorboard_writer


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
) -> dict[str, Any]:
    """Evaluate a run folder: `eval.json` with every number, `eval.md` and plots in RUN/eval.

    `data` is where the run's data set is now, if it moved (the run's network, classes and
    normalisation come from its checkpoint, not from the data).
    `amp` asks for bf16 forward passes; they run where `hardware.use_amp` allows, as in training.
    `bn_recalibrate` (True or a `Recalibration`) evaluates every sampled network with BatchNorm
    statistics re-estimated at its own eps from a fixed set of training images; its results go
    to RUN/eval-recalibrated unless `out` says otherwise."""

    if num_samples <= 0:
        raise ConfigError(f"--samples must be > 0, got {num_samples}")
    dev = resolve_device(device)
    amp = use_amp(dev, amp)
    net, cfg, info = load_run(run, dev)
    if data_root is not None:
        cfg.data_root = data_root
    if data is not None:
        cfg.dataset = data
    elif looks_like_path(cfg.dataset) and not Path(cfg.dataset).expanduser().exists():
        raise DataError(f"{cfg.dataset}, the data set this run was trained on, is not there any more; "
                        "pass where it is now with --data PATH")
    run_dir = checkpoint_path(run).parent
    recal = Recalibration() if bn_recalibrate is True else bn_recalibrate or None
    mode = choose_mode(dev) if mode == "auto" else mode
    test = build_test_loader(cfg, info, dev)
    ood_loaders = {name: ood_loader(name, cfg, info, dev) for name in ood or []}  # all read before any work
    out = Path(out) if out else run_dir / ("eval-recalibrated" if recal else "eval")
    out.mkdir(parents=True, exist_ok=True)
    recal_batches = recalibration_batches(cfg, info, recal, dev) if recal else None
    if recal_batches is not None:
        mode = "loop"
    pred, seconds = timed_predictions(net, test, num_samples=num_samples, seed=seed, mode=mode,
                                      keep_probs=save_probs, amp=amp, recalibration=recal_batches)
    protocol = ({"batchnorm": "recalibrated per sampled network", "recalibration": dataclasses.asdict(recal),
                 "recalibration_images": sum(len(x) for x in recal_batches)}
                if recal else {"batchnorm": "running statistics"})
    result = {"run": str(run_dir), "config": cfg.to_dict(), "protocol": protocol, **summarize(pred),
              "timing": {"seconds": seconds, "mode": mode, "device": str(dev), "precision": "bf16" if amp else "fp32"}}
    ood_scores = {}
    for name, loader in ood_loaders.items():
        ood_pred = sampled_predictions(net, loader, num_samples=num_samples, seed=seed, mode=mode, amp=amp,
                                       recalibration=recal_batches)
        result.setdefault("ood", {})[name] = ood_summary(pred, ood_pred)
        ood_scores[name] = {s: (getattr(pred, s).cpu(), getattr(ood_pred, s).cpu()) for s in ("total", "epistemic")}
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    if cfg.tensorboard:
        with tensorboard_writer(run_dir) as writer:
            writer.add_histogram("sampled_model_accuracy", torch.tensor(result["per_sample_accuracy"]), cfg.epochs)
            writer.add_scalar("ensemble_accuracy", result["ensemble"]["accuracy"], cfg.epochs)
    if save_probs:
        save_sample_probs(pred, out / "probs.npz")
    label = run_label(cfg)
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
    log = read_jsonl(run_dir / LOG)
    if log:
        report.plot_training_curves({label: log}, out / "training_curves.png")
    atomic_write_text(out / "eval.md", markdown_summary({label: result}))
    if progress:
        print(markdown_summary({label: result}))
        print(f"\n{num_samples} sampled models in {seconds:.1f} s ({mode}); results in {out}")
    return result


def ood_loader(name: str, cfg: TrainConfig, info: DatasetInfo, device: torch.device) -> DeviceLoader:
    """The test split of OOD set `name` (its training split is never read), normalised like the run's data."""
    ood_data = subset(load_dataset(name, "test", cfg.data_root), cfg.test_subset)
    check_images(f"OOD set {name}", ood_data, info)
    # OOD labels name other classes: only the uncertainty scores are used, labels are placeholders
    ood_data = ArrayDataset(ood_data.images, np.zeros_like(ood_data.labels), ood_data.classes)
    return eval_loader(ood_data, info.mean, info.std, device=device, channels_last=cfg.channels_last)


def recalibration_batches(cfg: TrainConfig, info: DatasetInfo, recal: Recalibration,
                          device: torch.device) -> list[Tensor]:
    """The fixed recalibration images of a run's training set, normalised, in batches on `device`."""
    train = recal.images(subset(load_dataset(cfg.dataset, "train", cfg.data_root), cfg.train_subset))
    loader = DeviceLoader(train, min(recal.batch_size, len(train)), train=False, mean=info.mean, std=info.std,
                          augment=False, device=device, channels_last=cfg.channels_last)
    return [x for x, _ in loader.batches()]


def run_label(cfg: Any) -> str:
    """A short name for a run in tables and legends: 'VI', 'VI + AS (lambda 0.8)', ..."""
    name = {"deterministic": "deterministic", "vi": "VI", "as": "VI + AS"}[cfg.method]
    if cfg.method == "as" and cfg.as_lambda != 0.8:
        name += f" (lambda {cfg.as_lambda:g})"
    return f"{name} s{cfg.seed}"


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
        [label, name, score, 100 * v["auroc"], 100 * v["aupr"], 100 * v["fpr95"]]
        for label, r in results.items() for name, by in r.get("ood", {}).items() for score, v in by.items()
    ]
    if ood_rows:
        text += "\n" + report.markdown_table(["run", "OOD set", "score", "AUROC", "AUPR", "FPR@95"], ood_rows) + "\n"
    return text


def compare_runs(runs: list[str | Path], out: str | Path = "runs/compare", csv_path: str | Path | None = None) -> str:
    """Several evaluated runs side by side: one table (compare.md) and one set of plots."""

    results, logs = {}, {}
    for run in runs:
        path = Path(run) / "eval" / "eval.json"
        if not path.is_file():
            raise ConfigError(f"{run} has no evaluation ({path}); run `asbnn eval {run}` first")
        result = json.loads(path.read_text())
        label = run_label(TrainConfig(**result["config"]))
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


def save_sample_probs(pred: Predictions, path: str | Path) -> None:
    """Per-sample probabilities (float16, compressed) so reports can be redrawn without re-running."""
    if pred.sample_probs is None:
        raise ValueError("predict(..., keep_probs=True) is needed to save the per-sample probabilities")
    np.savez_compressed(path, probs=pred.sample_probs.numpy(), labels=pred.labels.cpu().numpy())


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
