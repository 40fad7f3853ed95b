"""The numbers of an evaluation, the way the paper computes them and beyond (files: `results`).

A sampled model is one eps drawn once and held fixed over the whole test set (BatchNorm in eval
mode with the trained running statistics). K sampled models give per-model accuracies (lowest /
highest / mean), an ensemble (the average of their softmax outputs) and per-input uncertainty.
Everything is accumulated in one pass over the sampled logits with memory O(N * C), whatever K.

Samples are evaluated several at a time with `torch.func.vmap` over stacked eps ("batched"), or
one after another ("loop"); both give the same numbers, the faster one depends on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from . import metrics, streams
from .bn_recalibration import recalibrated
from .data import DeviceLoader
from .dropout import MCDropout
from .errors import ConfigError
from .hardware import autocast
from .posterior import Posterior

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
    mean_logits: Tensor | None = None  # [N, C] mean of the K logits: what energy and max-logit scores take

    @property
    def total(self) -> Tensor:
        return metrics.entropy(self.ensemble_probs)

    @property
    def epistemic(self) -> Tensor:
        return metrics.mutual_information(self.total, self.aleatoric)


def sampled_models(posterior: Posterior, seed: int, indices: range) -> Tensor:
    """The eps of sampled models `indices` ([len(indices), P]); each is seeded alone, so chunking never
    changes them."""
    device = next(posterior.parameters()).device
    return torch.stack([posterior.sample_eps(streams.eval_sample(device, seed, k)) for k in indices])


def _forward_samples(posterior: Posterior, x: Tensor, eps: Tensor, mode: Mode) -> Tensor:
    if mode == "batched":
        return vmap(lambda e: posterior(x, e))(eps)
    return torch.stack([posterior(x, e) for e in eps])


@torch.no_grad()
def sampled_predictions(
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
    AMX CPUs (and GPUs), metrics within 0.1 point (docs/benchmarks.md). It is done as asked;
    `hardware.use_amp` says where it pays. With `recalibration` (batches of training images), each
    sampled network is evaluated with BatchNorm statistics re-estimated at its own eps
    (`bn_recalibration`), one network at a time."""
    net.eval()
    bayesian = isinstance(net, (Posterior, MCDropout))  # a distribution over networks: K samples
    k_total = num_samples if bayesian else 1
    device = next(net.parameters()).device
    mode = choose_mode(device) if mode == "auto" else mode
    if recalibration is not None:  # statistics belong to one network: no vmap over several
        mode, chunk = "loop", 1
    labels = torch.cat([y for _, y in loader.batches()])
    n = len(labels)
    ens = aleatoric = mean_probs = kept = logit_sum = None
    correct = torch.zeros(k_total, device=device)
    nll = torch.zeros(k_total, device=device, dtype=torch.float64)
    for start in range(0, k_total, chunk):
        ks = range(start, min(start + chunk, k_total))
        eps = sampled_models(net, seed, ks) if bayesian else None
        offset = 0
        # recalibration: BatchNorm statistics of this one sampled network (chunk = 1)
        stats = nullcontext() if recalibration is None else recalibrated(net, eps[0] if bayesian else None, recalibration)
        with stats:
            for x, y in loader.batches():
                with autocast(device, amp):
                    logits = _forward_samples(net, x, eps, mode) if bayesian else net(x)[None]
                logp = logits.float().log_softmax(-1)  # [S, B, C]
                probs = logp.exp()
                if ens is None and int(y.max()) >= probs.shape[-1]:
                    raise ConfigError(f"labels go up to {int(y.max())} but the network has {probs.shape[-1]} classes")
                if ens is None:
                    ens = torch.zeros(n, probs.shape[-1], device=device, dtype=torch.float64)
                    aleatoric = torch.zeros(n, device=device, dtype=torch.float64)
                    logit_sum = torch.zeros(n, probs.shape[-1], device=device, dtype=torch.float64)
                    if keep_probs:
                        kept = torch.zeros(k_total, n, probs.shape[-1], dtype=torch.float16)
                rows = slice(offset, offset + len(y))
                ens[rows] += probs.sum(0).double()
                aleatoric[rows] += metrics.entropy(probs, logp).sum(0).double()
                logit_sum[rows] += logits.float().sum(0).double()
                correct[start:ks.stop] += metrics.correct_counts(logits, y)
                nll[start:ks.stop] += metrics.nll_sums(logp, y).double()
                if kept is not None:
                    kept[start:ks.stop, rows] = probs.half().cpu()
                offset += len(y)
    if bayesian:
        stats = nullcontext() if recalibration is None else recalibrated(net, "mean", recalibration)
        with stats, autocast(device, amp):
            mean_probs = torch.cat([net(x, "mean").float().softmax(-1) for x, _ in loader.batches()])
    return Predictions(
        labels=labels, ensemble_probs=(ens / k_total).float(), aleatoric=(aleatoric / k_total).float(),
        sample_correct=correct, sample_nll=nll.float(), mean_probs=mean_probs, sample_probs=kept,
        mean_logits=(logit_sum / k_total).float(),
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


def ood_scores(pred: Predictions) -> dict[str, Tensor]:
    """Per input, the OOD scores (higher = more OOD): total and epistemic uncertainty, and the
    energy and max-logit scores of the mean of the K sampled logits (`metrics.energy_score`)."""
    scores = {"total": pred.total, "epistemic": pred.epistemic}
    if pred.mean_logits is not None:
        scores["energy"] = metrics.energy_score(pred.mean_logits)
        scores["max_logit"] = metrics.max_logit_score(pred.mean_logits)
    return scores


def ood_summary(in_pred: Predictions, out_pred: Predictions) -> dict[str, dict[str, float]]:
    """OOD detection by each of `ood_scores`: AUROC, FPR at 95 % TPR and AUPR with the OOD inputs
    as the positive class ("aupr"), AUPR with the in-distribution inputs positive ("aupr_in")."""
    result = {}
    scores_in, scores_out = ood_scores(in_pred), ood_scores(out_pred)
    for name, s_in in scores_in.items():
        s_out = scores_out[name]
        result[name] = {
            "auroc": _f(metrics.auroc(s_in, s_out)), "aupr": _f(metrics.aupr(s_in, s_out)),
            "fpr95": _f(metrics.fpr_at_tpr(s_in, s_out, 0.95)), "aupr_in": _f(metrics.aupr_in(s_in, s_out)),
        }
    return result


def timed(predict: Callable[[], Predictions]) -> tuple[Predictions, float]:
    """`predict()` and the seconds it took (the device synchronised)."""
    began = time.perf_counter()
    pred = predict()
    if pred.labels.is_cuda:
        torch.cuda.synchronize()
    return pred, time.perf_counter() - began


def choose_mode(device: torch.device) -> Mode:
    """Batched samples win on GPUs; on CPUs the plain loop is as fast (see docs/benchmarks.md)."""
    return "batched" if device.type == "cuda" else "loop"
