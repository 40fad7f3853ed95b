"""Evaluation metrics for Bayesian predictions: accuracy, proper scores, calibration,
uncertainty decomposition, selective prediction and OOD detection.

All functions are stateless and vectorised over inputs. Conventions: ``probs`` is
[N, C] predictive probabilities, ``sample_probs`` is [K, N, C] per-sampled-model
probabilities, ``labels`` is [N] int64; logs are natural and taken of clamped values.
"""

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from asbnn.errors import ConfigError

EPS = 1e-12


def _check(probs: Tensor, labels: Tensor, dim: int = 2) -> None:
    if probs.dim() != dim or labels.dim() != 1 or probs.shape[-2] != labels.shape[0] or not labels.numel():
        want = "[N, C]" if dim == 2 else "[K, N, C]"
        raise ConfigError(
            f"expected probs {want} and labels [N] with N > 0, got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )


def _float(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _n_keep(fraction: float, n: int) -> int:
    """Smallest k with k/n >= fraction; the epsilon stops 0.6 * 5 = 3.0000000000000004 rounding up."""
    return max(1, math.ceil(fraction * n - 1e-9))


# ---------------------------------------------------------------- accuracy and scores


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    _check(probs, labels)
    return (probs.argmax(-1) == labels).to(probs.dtype).mean()


def correct_counts(scores: Tensor, labels: Tensor) -> Tensor:
    """[..., N, C] -> [...]: how many inputs have the label as top class. `scores` may be probabilities,
    log-probabilities or logits; sums, so that evaluation can add them up batch by batch."""
    return (scores.argmax(-1) == labels).sum(-1)


def per_sample_accuracy(sample_probs: Tensor, labels: Tensor) -> Tensor:
    """[K]: accuracy of each sampled model on its own, to compare against the ensemble."""
    _check(sample_probs, labels, dim=3)
    return correct_counts(sample_probs, labels).to(sample_probs.dtype) / labels.numel()


def _true_class_prob(probs: Tensor, labels: Tensor) -> Tensor:
    index = labels.expand(probs.shape[:-1]).unsqueeze(-1)
    return probs.gather(-1, index).squeeze(-1)


def nll(probs: Tensor, labels: Tensor) -> Tensor:
    _check(probs, labels)
    return -_true_class_prob(probs, labels).clamp_min(EPS).log().mean()


def nll_sums(log_probs: Tensor, labels: Tensor) -> Tensor:
    """[..., N, C] log-probabilities -> [...]: summed negative log-likelihood of the labels; sums, so
    that evaluation can add them up batch by batch from exact log-softmax values."""
    return -_true_class_prob(log_probs, labels).sum(-1)


def per_sample_nll(sample_probs: Tensor, labels: Tensor) -> Tensor:
    """[K]: NLL of each sampled model on its own."""
    _check(sample_probs, labels, dim=3)
    return nll_sums(sample_probs.clamp_min(EPS).log(), labels) / labels.numel()


def brier(probs: Tensor, labels: Tensor) -> Tensor:
    """Mean over inputs of the squared distance to the one-hot label (range [0, 2])."""
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(-1).mean()


# ---------------------------------------------------------------- calibration


def calibration_bins(
    probs: Tensor, labels: Tensor, n_bins: int = 15, adaptive: bool = False
) -> dict[str, Tensor]:
    """Per-bin mean confidence, accuracy and count of the top-1 prediction, plus the n_bins+1 edges.

    Equal-width bins are right-closed, (lo, hi]. Adaptive bins split the inputs sorted by
    confidence into n_bins runs whose sizes differ by at most one, so every bin carries the
    same statistical weight; their inner edges are midpoints between neighbouring runs.
    Empty bins report confidence and accuracy 0 with count 0.
    """
    _check(probs, labels)
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.max(-1)
    correct = (pred == labels).to(probs.dtype)
    n = conf.shape[0]
    if adaptive:
        sorted_conf, order = conf.sort(stable=True)
        rank_bin = torch.arange(n, device=conf.device) * n_bins // n
        bin_idx = torch.empty_like(rank_bin).scatter_(0, order, rank_bin)
        starts = (torch.arange(1, n_bins, device=conf.device) * n + n_bins - 1) // n_bins
        lo = sorted_conf[(starts - 1).clamp(0, n - 1)]
        hi = sorted_conf[starts.clamp(0, n - 1)]
        edges = torch.cat([conf.new_zeros(1), (lo + hi) / 2, conf.new_ones(1)])
    else:
        edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
        bin_idx = torch.bucketize(conf, edges[1:-1])
    count = torch.bincount(bin_idx, minlength=n_bins).to(probs.dtype)
    denom = count.clamp_min(1)
    conf_sum = conf.new_zeros(n_bins).scatter_add_(0, bin_idx, conf)
    acc_sum = conf.new_zeros(n_bins).scatter_add_(0, bin_idx, correct)
    return {"confidence": conf_sum / denom, "accuracy": acc_sum / denom, "count": count, "edges": edges}


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15, adaptive: bool = False) -> Tensor:
    """Expected calibration error: sum_b |acc_b - conf_b| * n_b / N (empty bins weigh 0)."""
    bins = calibration_bins(probs, labels, n_bins, adaptive)
    gap = (bins["accuracy"] - bins["confidence"]).abs()
    return (gap * bins["count"]).sum() / bins["count"].sum()


# ---------------------------------------------------------------- uncertainty


def entropy(probs: Tensor, log_probs: Tensor | None = None) -> Tensor:
    """Entropy over the last (class) axis; 0 log 0 counts as 0. Pass `log_probs` where they are
    known exactly (log-softmax), else they are taken of the clamped probabilities."""
    if log_probs is None:
        log_probs = probs.clamp_min(EPS).log()
    return -(probs * log_probs).sum(-1)


def mutual_information(total: Tensor, aleatoric: Tensor) -> Tensor:
    """Epistemic uncertainty: total entropy minus expected entropy (rounding can make it a hair below 0)."""
    return (total - aleatoric).clamp_min(0)


def uncertainty(sample_probs: Tensor) -> dict[str, Tensor]:
    """Split predictive entropy into aleatoric (expected entropy) and epistemic (mutual information)."""
    if sample_probs.dim() != 3:
        raise ConfigError(f"sample_probs must be [K, N, C], got shape {tuple(sample_probs.shape)}")
    total = entropy(sample_probs.mean(0))
    aleatoric = entropy(sample_probs).mean(0)
    return {"total": total, "aleatoric": aleatoric, "epistemic": mutual_information(total, aleatoric)}


# ---------------------------------------------------------------- selective prediction


def _errors_by_confidence(correct: Tensor, score: Tensor) -> Tensor:
    """Cumulative error counts over inputs ordered from least to most uncertain (stable on ties)."""
    if correct.shape != score.shape or correct.dim() != 1 or correct.numel() == 0:
        raise ConfigError(
            f"correct {tuple(correct.shape)} and score {tuple(score.shape)} must be equal non-empty [N]"
        )
    order = score.sort(stable=True).indices
    return (1 - correct[order].to(_float(score))).cumsum(0)


def selective_accuracy(
    correct: Tensor, score: Tensor, coverages: Sequence[float] = (0.2, 0.4, 0.6, 0.8)
) -> dict[float, Tensor]:
    """Accuracy on the ceil(coverage * N) inputs with the lowest uncertainty score."""
    cum_err = _errors_by_confidence(correct, score)
    n = cum_err.shape[0]
    out = {}
    for cov in coverages:
        if not 0 < cov <= 1:
            raise ConfigError(f"coverage must be in (0, 1], got {cov}")
        k = _n_keep(cov, n)
        out[float(cov)] = 1 - cum_err[k - 1] / k
    return out


def risk_coverage(correct: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """Coverage k/N and error rate among the k lowest-score inputs, for k = 1..N."""
    cum_err = _errors_by_confidence(correct, score)
    k = torch.arange(1, cum_err.shape[0] + 1, dtype=cum_err.dtype, device=cum_err.device)
    return k / k[-1], cum_err / k


def aurc(correct: Tensor, score: Tensor) -> Tensor:
    """Area under the risk-coverage curve: the risk averaged over the N coverages k/N."""
    return risk_coverage(correct, score)[1].mean()


# ---------------------------------------------------------------- OOD detection
# OOD inputs are the positive class and a higher score means "more OOD".


def _check_scores(score_in: Tensor, score_out: Tensor) -> tuple[Tensor, Tensor]:
    """Validate and cast both to one dtype, which searchsorted needs."""
    if score_in.dim() != 1 or score_out.dim() != 1 or not score_in.numel() or not score_out.numel():
        raise ConfigError(
            f"scores must be non-empty 1-D, got {tuple(score_in.shape)} and {tuple(score_out.shape)}"
        )
    dtype = torch.promote_types(score_in.dtype, score_out.dtype)
    return score_in.to(dtype), score_out.to(dtype)


def auroc(score_in: Tensor, score_out: Tensor) -> Tensor:
    """P(score_out > score_in) + P(tie) / 2, the Mann-Whitney U statistic normalised to [0, 1]."""
    score_in, score_out = _check_scores(score_in, score_out)
    sorted_in = score_in.sort().values
    below = torch.searchsorted(sorted_in, score_out, right=False).double()
    at_or_below = torch.searchsorted(sorted_in, score_out, right=True).double()
    u = (below + at_or_below).sum() / 2
    return (u / (score_in.numel() * score_out.numel())).to(_float(score_in))


def aupr(score_in: Tensor, score_out: Tensor) -> Tensor:
    """Average precision, sum_t (R_t - R_{t-1}) P_t over distinct thresholds t, descending."""
    score_in, score_out = _check_scores(score_in, score_out)
    thresholds = torch.cat([score_in, score_out]).unique().flip(0)
    # number of scores >= t, from the count of scores < t
    tp = score_out.numel() - torch.searchsorted(score_out.sort().values, thresholds, right=False)
    fp = score_in.numel() - torch.searchsorted(score_in.sort().values, thresholds, right=False)
    precision = tp.double() / (tp + fp).double()
    recall = tp.double() / score_out.numel()
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return (recall_step * precision).sum().to(_float(score_in))


def fpr_at_tpr(score_in: Tensor, score_out: Tensor, tpr: float = 0.95) -> Tensor:
    """False-positive rate at the highest threshold that still flags `tpr` of the OOD inputs."""
    score_in, score_out = _check_scores(score_in, score_out)
    if not 0 < tpr <= 1:
        raise ConfigError(f"tpr must be in (0, 1], got {tpr}")
    k = _n_keep(tpr, score_out.numel())
    threshold = score_out.sort(descending=True).values[k - 1]
    return (score_in >= threshold).to(_float(score_in)).mean()


def aupr_in(score_in: Tensor, score_out: Tensor) -> Tensor:
    """AUPR with the in-distribution inputs as the positive class: `aupr` on negated scores.

    Reported beside `aupr` (OOD positive) because average precision depends on which class is
    positive and on the class ratio; the pair shows whether a detector is good at both ends.
    """
    return aupr(-score_out, -score_in)


# Logit-based OOD scores. They take [N, C] logits of one network; for a Bayesian ensemble of K
# sampled networks pass the mean of the K logit tensors ("energy of the mean logits"). Do not
# pass log ensemble probabilities: their logsumexp is log(1) = 0, so the energy at T = 1 is the
# same for every input, and the max logit would merely rank like the maximum softmax probability.


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or not logits.numel():
        raise ConfigError(f"logits must be non-empty [N, C], got shape {tuple(logits.shape)}")


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """[N]: the free energy -T * logsumexp(logits / T) of Liu et al. (2020), higher = more OOD.

    Confident in-distribution inputs have large logits, hence a large logsumexp and low energy.
    As T -> 0 this tends to `max_logit_score`.
    """
    _check_logits(logits)
    if not 0 < temperature < math.inf:
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def max_logit_score(logits: Tensor) -> Tensor:
    """[N]: minus the largest logit (Hendrycks et al., 2022), higher = more OOD."""
    _check_logits(logits)
    return -logits.max(-1).values
