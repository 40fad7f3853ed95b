"""Temperature scaling (Guo et al., 2017): a post-hoc calibration baseline.

One scalar T > 0 is fitted on held-out data by minimising the NLL of softmax(logits / T); the
argmax, and so the accuracy, is unchanged. T > 1 softens overconfident predictions.

Bayesian and ensemble predictions come as probabilities, not logits. The convention here is to
treat the log of the ensemble (posterior-mean) probabilities as logits (`logits_from_probs`):
softmax(log p / T) is proportional to p ** (1 / T), so T = 1 gives back p exactly, and the
temperature acts on the predictive distribution that is actually evaluated rather than on any
one sampled network.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from asbnn import metrics
from asbnn.errors import ConfigError
from asbnn.metrics import EPS

# The search interval for T; a fitted T at either end means the optimum lies beyond it.
T_MIN, T_MAX = 0.05, 20.0
_INV_PHI = (math.sqrt(5) - 1) / 2  # golden-section ratio, about 0.618


def logits_from_probs(probs: Tensor) -> Tensor:
    """Log of (ensemble) probabilities, clamped away from log 0 so every entry is finite."""
    return probs.clamp_min(EPS).log()


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0] or not labels.numel():
        raise ConfigError(
            f"expected logits [N, C] and labels [N] with N > 0, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not torch.isfinite(logits).all():
        raise ConfigError("logits must be finite; for probabilities use logits_from_probs")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ConfigError(f"labels must lie in [0, {logits.shape[1]}), got [{labels.min()}, {labels.max()}]")


def fit_temperature(logits: Tensor, labels: Tensor, tol: float = 1e-8) -> float:
    """The T in [T_MIN, T_MAX] minimising the mean NLL of softmax(logits / T).

    Golden-section search on log T. The NLL is convex in 1/T (a log-sum-exp of functions linear
    in 1/T, minus a linear term), hence unimodal in log T, so the search finds the global
    minimum within the interval, deterministically. The result is never worse on the fit set
    than T = 1, even when the optimum lies within `tol` of it.
    """
    _check(logits, labels)
    z, y = logits.detach().double(), labels.long()

    def nll(log_t: float) -> float:
        return F.cross_entropy(z / math.exp(log_t), y).item()

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    a, b = hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > tol:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - _INV_PHI * (hi - lo)
            fa = nll(a)
        else:  # the minimum lies in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + _INV_PHI * (hi - lo)
            fb = nll(b)
    best, f_best = (a, fa) if fa <= fb else (b, fb)
    return 1.0 if nll(0.0) <= f_best else math.exp(best)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Calibrated probabilities softmax(logits / T), [N, C], ready for the `asbnn.metrics` functions."""
    if not 0 < temperature < math.inf:
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")
    return torch.softmax(logits / temperature, dim=-1)


def holdout_indices(n_train: int, fraction: float = 0.1, cap: int = 5000, seed: int = 0) -> np.ndarray:
    """The training images temperature scaling is fitted on: a fixed seeded subset of `fraction` of
    them, at most `cap`, sorted. The network was trained on them too (no split was held out during
    training), so T fitted here tends to be lower than one fitted on unseen data."""
    n = max(1, min(cap, int(fraction * n_train)))
    return np.sort(np.random.default_rng(seed).permutation(n_train)[:n])


def calibrated_numbers(holdout_probs: Tensor, holdout_labels: Tensor, probs: Tensor, labels: Tensor) -> dict:
    """T fitted on the hold-out predictions; the test NLL and ECE before and after applying it."""
    temperature = fit_temperature(logits_from_probs(holdout_probs), holdout_labels)
    after = apply_temperature(logits_from_probs(probs), temperature)
    return {"temperature": temperature,
            "before": {"nll": float(metrics.nll(probs, labels)), "ece": float(metrics.ece(probs, labels))},
            "after": {"nll": float(metrics.nll(after, labels)), "ece": float(metrics.ece(after, labels))}}
