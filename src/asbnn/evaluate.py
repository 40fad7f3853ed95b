"""Evaluation the way the paper does it, and beyond.

A sampled model is one eps drawn once and held fixed over the whole test set (BatchNorm in eval
mode with the trained running statistics). K sampled models give per-model accuracies (lowest /
highest / mean), an ensemble (the average of their softmax outputs) and per-input uncertainty.
Everything is accumulated in one pass over the sampled logits with memory O(N * C), whatever K.

Samples are evaluated several at a time with `torch.func.vmap` over stacked eps ("batched"), or
one after another ("loop"); both give the same numbers, the faster one depends on the device.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from . import metrics, report
from .bn_recalibration import Recalibration, recalibrated
from .checkpoint import atomic_write_text, read_jsonl
from .config import TrainConfig
from .data import ArrayDataset, DeviceLoader, dataset_info, load_dataset
from .errors import ConfigError
from .export import results_csv
from .posterior import Posterior
from .train import (
    build_data, checkpoint_path, load_run, make_generator, resolve_device, subset, tensorboard_writer,
)

Mode = Literal["batched", "loop"]
COVERAGES = (0.2, 0.4, 0.6, 0.8)


@dataclass
class Predictions:
    """What the K sampled models said about one data set, reduced on the fly."""

    labels: Tensor  # [N]
    ensemble_probs: Tensor  # [N, C] mean of the K softmax outputs
    aleatoric: Tensor  # [N] mean entropy of the K predictive distributions
    sample_correct: Tensor  # [K] number of correct predictions of each sampled model
    sample_nll: Tensor  # [K] summed negative log-likelihood of each sampled model
    mean_probs: Tensor | None = None  # [N, C] the network at the posterior mean
    sample_probs: Tensor | None = None  # [K, N, C] float16, only when asked to keep them

    @property
    def total(self) -> Tensor:
        return metrics.entropy(self.ensemble_probs)

    @property
    def epistemic(self) -> Tensor:
        return (self.total - self.aleatoric).clamp_min(0)


def sample_eps(posterior: Posterior, seed: int, indices: range) -> Tensor:
    """eps of sampled models `indices`; each is seeded on its own, so chunking never changes them."""
    device = posterior.mu.device
    return torch.stack([posterior.sample_eps(make_generator(device, seed, 7, k)) for k in indices])


def _forward_samples(posterior: Posterior, x: Tensor, eps: Tensor, mode: Mode) -> Tensor:
    if mode == "batched":
        return vmap(lambda e: posterior(x, e))(eps)
    return torch.stack([posterior(x, e) for e in eps])


@torch.no_grad()
def predict(
    net: nn.Module,
    loader: DeviceLoader,
    num_samples: int = 100,
    seed: int = 0,
    *,
    mode: Mode | Literal["auto"] = "auto",
    chunk: int = 10,
    keep_probs: bool = False,
    amp: bool = False,
    recalibration: Sequence[Tensor] | None = None,
) -> Predictions:
    """Run K sampled models (or one deterministic network) over `loader` and reduce the outputs.

    `amp` runs the forward passes in bf16 autocast (logits reduced in fp32): about 2x faster on
    AMX CPUs (and GPUs), metrics within 0.1 point (docs/benchmarks.md). With `recalibration`
    (batches of training images), each sampled network is evaluated with BatchNorm statistics
    re-estimated at its own eps (`bn_recalibration`), one network at a time."""
    net.eval()
    bayesian = isinstance(net, Posterior)
    k_total = num_samples if bayesian else 1
    device = next(net.parameters()).device
    mode = choose_mode(device) if mode == "auto" else mode
    if recalibration is not None:  # statistics belong to one network: no vmap over several
        mode, chunk = "loop", 1
    labels = torch.cat([y for _, y in loader.batches()])
    n = len(labels)
    ens = aleatoric = mean_probs = kept = None
    correct = torch.zeros(k_total, device=device)
    nll = torch.zeros(k_total, device=device, dtype=torch.float64)
    for start in range(0, k_total, chunk):
        ks = range(start, min(start + chunk, k_total))
        eps = sample_eps(net, seed, ks) if bayesian else None
        offset = 0
        # recalibration: BatchNorm statistics of this one sampled network (chunk = 1)
        stats = nullcontext() if recalibration is None else recalibrated(net, eps[0] if bayesian else None, recalibration)
        with stats:
            for x, y in loader.batches():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = _forward_samples(net, x, eps, mode) if bayesian else net(x)[None]
                logp = logits.float().log_softmax(-1)  # [S, B, C]
                probs = logp.exp()
                if ens is None and int(y.max()) >= probs.shape[-1]:
                    raise ConfigError(f"labels go up to {int(y.max())} but the network has {probs.shape[-1]} classes")
                if ens is None:
                    ens = torch.zeros(n, probs.shape[-1], device=device, dtype=torch.float64)
                    aleatoric = torch.zeros(n, device=device, dtype=torch.float64)
                    if keep_probs:
                        kept = torch.zeros(k_total, n, probs.shape[-1], dtype=torch.float16)
                rows = slice(offset, offset + len(y))
                ens[rows] += probs.sum(0).double()
                aleatoric[rows] += -(probs * logp).sum(-1).sum(0).double()
                correct[start:ks.stop] += (logits.argmax(-1) == y).sum(1)
                nll[start:ks.stop] += -logp.gather(-1, y.expand(len(ks), -1)[..., None]).squeeze(-1).sum(1).double()
                if kept is not None:
                    kept[start:ks.stop, rows] = probs.half().cpu()
                offset += len(y)
    if bayesian:
        stats = nullcontext() if recalibration is None else recalibrated(net, "mean", recalibration)
        with stats, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mean_probs = torch.cat([net(x, "mean").float().softmax(-1) for x, _ in loader.batches()])
    return Predictions(
        labels=labels, ensemble_probs=(ens / k_total).float(), aleatoric=(aleatoric / k_total).float(),
        sample_correct=correct, sample_nll=nll.float(), mean_probs=mean_probs, sample_probs=kept,
    )


def _f(x: Tensor | float) -> float:
    return float(x)


def summarize(pred: Predictions) -> dict[str, Any]:
    """Every number of the evaluation as plain floats (accuracies as fractions)."""
    n = len(pred.labels)
    acc = pred.sample_correct / n
    probs, labels = pred.ensemble_probs, pred.labels
    correct = (probs.argmax(1) == labels).float()
    scores = {"total": pred.total, "epistemic": pred.epistemic, "max_prob": -probs.max(1).values}
    out: dict[str, Any] = {
        "num_samples": len(acc),
        "num_inputs": n,
        "sampled": {
            "lowest": _f(acc.min()), "highest": _f(acc.max()), "mean": _f(acc.mean()),
            "std": _f(acc.std()) if len(acc) > 1 else 0.0, "mean_nll": _f((pred.sample_nll / n).mean()),
        },
        "per_sample_accuracy": acc.tolist(),
        "per_sample_nll": (pred.sample_nll / n).tolist(),
        "ensemble": {
            "accuracy": _f(metrics.accuracy(probs, labels)), "nll": _f(metrics.nll(probs, labels)),
            "brier": _f(metrics.brier(probs, labels)), "ece": _f(metrics.ece(probs, labels)),
            "ece_adaptive": _f(metrics.ece(probs, labels, adaptive=True)),
        },
        "uncertainty": {
            "total": _f(pred.total.mean()), "aleatoric": _f(pred.aleatoric.mean()),
            "epistemic": _f(pred.epistemic.mean()),
        },
        "selective": {
            name: {str(c): _f(v) for c, v in metrics.selective_accuracy(correct, s, COVERAGES).items()}
            for name, s in scores.items()
        },
        "aurc": {name: _f(metrics.aurc(correct, s)) for name, s in scores.items()},
    }
    if pred.mean_probs is not None:
        out["posterior_mean"] = {
            "accuracy": _f(metrics.accuracy(pred.mean_probs, labels)),
            "nll": _f(metrics.nll(pred.mean_probs, labels)),
        }
    return out


def ood_summary(in_pred: Predictions, out_pred: Predictions) -> dict[str, dict[str, float]]:
    """OOD detection (OOD = positive, higher score = more OOD) by total and epistemic uncertainty."""
    result = {}
    for name in ("total", "epistemic"):
        s_in, s_out = getattr(in_pred, name), getattr(out_pred, name)
        result[name] = {
            "auroc": _f(metrics.auroc(s_in, s_out)), "aupr": _f(metrics.aupr(s_in, s_out)),
            "fpr95": _f(metrics.fpr_at_tpr(s_in, s_out, 0.95)),
        }
    return result


def timed_predict(net: nn.Module, loader: DeviceLoader, **kwargs: Any) -> tuple[Predictions, float]:
    began = time.perf_counter()
    pred = predict(net, loader, **kwargs)
    if pred.labels.is_cuda:
        torch.cuda.synchronize()
    return pred, time.perf_counter() - began


def save_sample_probs(pred: Predictions, path: str | Path) -> None:
    """Per-sample probabilities (float16, compressed) so reports can be redrawn without re-running."""
    if pred.sample_probs is None:
        raise ValueError("predict(..., keep_probs=True) is needed to save the per-sample probabilities")
    np.savez_compressed(path, probs=pred.sample_probs.numpy(), labels=pred.labels.cpu().numpy())


def choose_mode(device: torch.device) -> Mode:
    """Batched samples win on GPUs; on CPUs the plain loop is as fast (see docs/benchmarks.md)."""
    return "batched" if device.type == "cuda" else "loop"


def evaluate_run(
    run: str | Path,
    num_samples: int = 100,
    seed: int = 0,
    *,
    ood: list[str] | None = None,
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

    `bn_recalibrate` (True or a `Recalibration`) evaluates every sampled network with BatchNorm
    statistics re-estimated at its own eps from a fixed set of training images; its results go
    to RUN/eval-recalibrated unless `out` says otherwise."""

    if num_samples <= 0:
        raise ConfigError(f"--samples must be > 0, got {num_samples}")
    dev = resolve_device(device)
    net, cfg, info = load_run(run, dev)
    if data_root is not None:
        cfg.data_root = data_root
    run_dir = checkpoint_path(run).parent
    recal = Recalibration() if bn_recalibrate is True else bn_recalibrate or None
    out = Path(out) if out else run_dir / ("eval-recalibrated" if recal else "eval")
    out.mkdir(parents=True, exist_ok=True)
    mode = choose_mode(dev) if mode == "auto" else mode
    data = build_data(cfg, dev)
    recal_batches = recalibration_batches(cfg, info, recal, dev) if recal else None
    if recal_batches is not None:
        mode = "loop"
    pred, seconds = timed_predict(net, data.test, num_samples=num_samples, seed=seed, mode=mode, keep_probs=save_probs,
                                  amp=amp, recalibration=recal_batches)
    protocol = ({"batchnorm": "recalibrated per sampled network", "recalibration": dataclasses.asdict(recal),
                 "recalibration_images": sum(len(x) for x in recal_batches)}
                if recal else {"batchnorm": "running statistics"})
    result = {"run": str(run_dir), "config": cfg.to_dict(), "protocol": protocol, **summarize(pred),
              "timing": {"seconds": seconds, "mode": mode, "device": str(dev), "precision": "bf16" if amp else "fp32"}}
    ood_scores = {}
    for name in ood or []:
        ood_info = dataset_info(name)
        if (ood_info.channels, ood_info.image_size) != (info.channels, info.image_size):
            raise ConfigError(f"OOD set {name} has {ood_info.channels}x{ood_info.image_size}px images, "
                              f"the model expects {info.channels}x{info.image_size}px")
        ood_data = subset(load_dataset(name, "test", cfg.data_root), cfg.test_subset)
        # OOD labels name other classes: only the uncertainty scores are used, labels are placeholders
        ood_data = ArrayDataset(ood_data.images, np.zeros_like(ood_data.labels), ood_data.classes)
        loader = DeviceLoader(ood_data, min(500, len(ood_data.labels)), train=False, mean=info.mean,
                              std=info.std, augment=False, device=dev, channels_last=cfg.channels_last)
        ood_pred = predict(net, loader, num_samples=num_samples, seed=seed, mode=mode, amp=amp,
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
    log = read_jsonl(run_dir / "log.jsonl")
    if log:
        report.plot_training_curves({label: log}, out / "training_curves.png")
    atomic_write_text(out / "eval.md", markdown_summary({label: result}))
    if progress:
        print(markdown_summary({label: result}))
        print(f"\n{num_samples} sampled models in {seconds:.1f} s ({mode}); results in {out}")
    return result


def recalibration_batches(cfg: TrainConfig, info: Any, recal: Recalibration, device: torch.device) -> list[Tensor]:
    """The fixed recalibration images of a run's training set, normalised, in batches on `device`."""
    train = recal.images(subset(load_dataset(cfg.dataset, "train", cfg.data_root), cfg.train_subset))
    loader = DeviceLoader(train, min(recal.batch_size, len(train)), train=False, mean=info.mean, std=info.std, augment=False,
                          device=device, channels_last=cfg.channels_last)
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
        logs[label] = read_jsonl(Path(run) / "log.jsonl")
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
