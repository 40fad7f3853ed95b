"""The numbers of an evaluation, the way the paper computes them and beyond (files: `results`).

A sampled model is one eps drawn once and held fixed over the whole test set (BatchNorm in eval
mode with the trained running statistics). K sampled models give per-model accuracies (lowest /
highest / mean), an ensemble (the average of their softmax outputs) and per-input uncertainty.
Everything is accumulated in one pass over the sampled logits with memory O(N * C), whatever K.

Samples are evaluated several at a time with `torch.func.vmap` over stacked eps ("batched"), or
one after another ("loop"); both give the same numbers, the faster one depends on the device.
The fast evaluation (`fast`, with bf16 where it pays: `asbnn eval --amp`) folds BatchNorm into the
convolutions, runs each convolution with its residual addition and ReLU as one oneDNN call on CPUs
(`fusion`), feeds NHWC batches and forms each sampled network's weights once, not once per batch:
in fp32 its numbers differ from the exact ones in the last bits. In bf16, every (network, input)
pair whose top two logits are closer than `RECHECK_MARGIN` is recomputed in fp32 (`recheck_near_ties`),
so each sampled network predicts the fp32 class: the per-sample accuracies and the posterior mean's
came out exact where measured; the ensemble metrics keep the bf16 rounding of the other pairs'
probabilities (ensemble accuracy within 0.05 point, ECE within 0.14 point on 2,000 images;
docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import metrics, streams
from .adversarial import feeds_only_batchnorm
from .bn_recalibration import recalibrated
from .data import DeviceLoader
from .dropout import MCDropout
from .errors import ConfigError
from .fusion import fuse_conv_relu
from .hardware import autocast
from .posterior import Posterior

Mode = Literal["batched", "loop"]
COVERAGES = (0.2, 0.4, 0.6, 0.8)
# bf16 evaluation: a (network, image) pair whose top-1 minus top-2 logit margin is below this is
# recomputed in fp32 (`recheck_near_ties`). Measured (benchmarks/eval_fidelity.py, docs/benchmarks.md)
# on 20 sampled networks of a weak VI ResNet-20 (CIFAR-10, 2,000 images) and of a VI LeNet-5
# (Fashion-MNIST, 10,000 images), folded, NHWC: the largest |bf16 - fp32| logit over the classes is
# 0.044 and 0.157 (99.99th percentiles 0.038 and 0.116), but what decides a changed class is the
# error of the margin between the top class and a close one (within 1 of it): at most 0.041 and
# 0.079, and bf16 changed a class only at margins up to 0.008 and 0.031. 0.2 is 2.5x the largest
# margin error and 6x the largest margin that flipped; it rechecks 31 % and 7 % of the pairs there
# (the weak ResNet-20's logits are flat: many near-ties). Logit errors grow with the logits' size:
# a network with much larger logits near its ties may need a larger `tau` (measure it with that script).
# On a real posterior (the mid scale's VI ResNet-20, 10 networks x 10,000 images, conv + ReLU fused)
# the margin error reached 0.167 and a class flipped at a bf16 margin of 0.078: a thinner safety
# factor (1.2x), yet every sampled accuracy came out exact; a pair the margin misses moves one
# network's accuracy by one image (0.01 point at 10,000 images).
RECHECK_MARGIN = 0.2


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
    rechecked: int = 0  # (sampled network, input) pairs of a bf16 evaluation recomputed in fp32 (near-ties)

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


class FoldedNetwork:
    """A posterior's network for evaluation with each BatchNorm that directly follows a convolution
    folded into that convolution (in eval mode BatchNorm is a fixed affine map per channel), so it
    costs no pass over the activations: ResNet-20's forward is 1.3x faster in bf16 on a CPU.

    The graph is traced once (torch.fx); `weights` folds each sampled network's weights, and the
    BatchNorm statistics of that moment (recalibrated ones too), in a few small tensor operations.
    Each convolution followed by a ReLU (after a residual addition or not) then runs as one oneDNN
    call on CPUs (`fusion`): another 1.3x.
    """

    def __init__(self, posterior: Posterior) -> None:
        self.posterior = posterior
        graph = torch.fx.symbolic_trace(copy.deepcopy(posterior.model))
        modules = dict(graph.named_modules())
        self.pairs: dict[str, tuple[str, float]] = {}  # convolution -> (its BatchNorm, that one's eps)
        for node in list(graph.graph.nodes):
            conv = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(conv, nn.modules.conv._ConvNd) or not feeds_only_batchnorm(node, graph):
                continue
            (norm,) = node.users
            bn = modules[norm.target]
            if bn.running_mean is None:  # batch statistics even in eval mode: nothing fixed to fold
                continue
            norm.replace_all_uses_with(node)
            graph.graph.erase_node(norm)
            self.pairs[node.target] = (norm.target, bn.eps)
            if conv.bias is None:  # a slot for the folded bias
                del conv._parameters["bias"]
                conv.register_buffer("bias", torch.empty(0), persistent=False)
        graph.delete_all_unused_submodules()
        graph.recompile()
        self.fused = fuse_conv_relu(graph)  # after the pruning: fused convolutions are read by name only
        self.graph = graph
        self.names = [n for n, _ in graph.named_parameters()] + [n for n, _ in graph.named_buffers()]

    def weights(self, eps: Tensor | Literal["mean"]) -> dict[str, Tensor]:
        """Everything the folded network runs with, at `eps`, keyed by name."""
        values = {**self.posterior.model.state_dict(keep_vars=True), **self.posterior.weights(eps)}
        for conv, (bn, bn_eps) in self.pairs.items():
            scale = values[f"{bn}.running_var"].add(bn_eps).rsqrt()
            if f"{bn}.weight" in values:
                scale = scale * values[f"{bn}.weight"]
            weight = values[f"{conv}.weight"]
            bias = values.get(f"{conv}.bias", torch.zeros_like(scale)) - values[f"{bn}.running_mean"]
            values[f"{conv}.weight"] = weight * scale.view(-1, *[1] * (weight.dim() - 1))
            values[f"{conv}.bias"] = bias * scale + values.get(f"{bn}.bias", torch.zeros_like(scale))
        return {name: values[name] for name in self.names}

    def __call__(self, x: Tensor, weights: Sequence[dict[str, Tensor]]) -> Tensor:
        return torch.stack([functional_call(self.graph, w, (x,), strict=True) for w in weights])


def folded(posterior: Posterior) -> FoldedNetwork | None:
    """`posterior`'s network with BatchNorm folded, or None for a model torch.fx cannot trace
    (data-dependent control flow, ...): the fast evaluation then runs it unfolded."""
    try:
        return FoldedNetwork(posterior)
    except Exception:  # fx fails in many ways on untraceable code; unfolded is always correct
        return None


def _nhwc(x: Tensor) -> Tensor:
    """Image batches with several channels in NHWC, the layout oneDNN's CPU convolutions prefer."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.shape[1] > 1 else x


def _forward_samples(posterior: Posterior, x: Tensor, eps: Tensor, mode: Mode) -> Tensor:
    if mode == "batched":
        return vmap(lambda e: posterior(x, e))(eps)
    return torch.stack([posterior(x, e) for e in eps])


def recheck_near_ties(logits: Tensor, x: Tensor, tau: float, forward: Callable[[int, Tensor], Tensor]) -> tuple[Tensor, int]:
    """bf16 logits [S, B, C] of S networks on the batch `x`, in fp32, with every (network, image) pair
    whose top-1 minus top-2 margin is below `tau` recomputed by `forward(s, images)` (network s on
    those images, in fp32); and how many pairs that was.

    Why: bf16 rounding changes a network's predicted class only where two logits nearly tie, so
    recomputing those pairs gives every network's fp32 prediction, hence the fp32 per-sample
    accuracies, at a cost in proportion to how many pairs nearly tie. Eval-mode BatchNorm treats each image on its own, so a subset of
    the batch gives the same logits as the whole. One forward pass per network with any near-tie."""
    logits = logits.float()
    top2 = logits.topk(2, dim=-1).values
    near = top2[..., 0] - top2[..., 1] < tau  # [S, B]
    for s in near.any(1).nonzero().flatten().tolist():
        rows = near[s].nonzero().flatten()
        logits[s].index_copy_(0, rows, forward(s, x.index_select(0, rows)).float())
    return logits, int(near.sum())


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
    fast: bool = False,
    recalibration: Sequence[Tensor] | None = None,
    tau: float = RECHECK_MARGIN,
) -> Predictions:
    """Run K sampled models (or one deterministic network) over `loader` and reduce the outputs.

    `amp` runs the forward passes in bf16 autocast (logits reduced in fp32): about 2x faster on
    AMX CPUs (and GPUs). It is done as asked; `hardware.choose_precision` says where it pays. Pairs
    of a sampled network and an input whose top-1 minus top-2 logit margin is below `tau` are then
    recomputed in fp32 (`recheck_near_ties`): each network's predicted classes are the fp32 ones,
    the ensemble's probabilities keep the other pairs' bf16 rounding (the module docstring);
    `tau=0` rechecks nothing. `fast`: BatchNorm folded, NHWC batches (see the module docstring; the
    exact fp32 numbers change in the last bits). With `recalibration`
    (batches of training images), each sampled network is evaluated with BatchNorm statistics
    re-estimated at its own eps (`bn_recalibration`), one network at a time."""
    net.eval()
    bayesian = isinstance(net, (Posterior, MCDropout))  # a distribution over networks: K samples
    k_total = num_samples if bayesian else 1
    device = next(net.parameters()).device
    mode = choose_mode(device) if mode == "auto" else mode
    if recalibration is not None:  # statistics belong to one network: no vmap over several
        mode, chunk = "loop", 1
    fold = folded(net) if fast and isinstance(net, Posterior) else None
    prepare = _nhwc if fast else (lambda x: x)
    labels = torch.cat([y for _, y in loader.batches()])
    n = len(labels)
    ens = aleatoric = mean_probs = kept = logit_sum = None
    rechecked = 0
    correct = torch.zeros(k_total, device=device)
    nll = torch.zeros(k_total, device=device, dtype=torch.float64)
    for start in range(0, k_total, chunk):
        ks = range(start, min(start + chunk, k_total))
        eps = sampled_models(net, seed, ks) if bayesian else None
        offset = 0
        # recalibration: BatchNorm statistics of this one sampled network (chunk = 1)
        stats = nullcontext() if recalibration is None else recalibrated(net, eps[0] if bayesian else None, recalibration)
        with stats:
            weights = [fold.weights(e) for e in eps] if fold is not None else None  # once per network

            def network(s: int, x: Tensor) -> Tensor:  # the chunk's sampled network s on x
                x = prepare(x)  # a subset of a batch (index_select) comes back NCHW
                if weights is not None:
                    return fold(x, weights[s : s + 1])[0]
                return net(x, eps[s]) if bayesian else net(x)

            for x, y in loader.batches():
                x = prepare(x)
                with autocast(device, amp):
                    if weights is not None:
                        logits = fold(x, weights)
                    else:
                        logits = _forward_samples(net, x, eps, mode) if bayesian else net(x)[None]
                if amp:
                    logits, count = recheck_near_ties(logits, x, tau, network)
                    rechecked += count
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
        with stats:
            mean_weights = [fold.weights("mean")] if fold is not None else None

            def mean_network(_: int, x: Tensor) -> Tensor:  # the network at the posterior mean on x
                return fold(prepare(x), mean_weights)[0] if mean_weights is not None else net(x, "mean")

            batches = []
            for x, _ in loader.batches():
                with autocast(device, amp):
                    logits = mean_network(0, x)[None]
                if amp:
                    logits = recheck_near_ties(logits, x, tau, mean_network)[0]
                batches.append(logits[0].float().softmax(-1))
            mean_probs = torch.cat(batches)
    return Predictions(
        labels=labels, ensemble_probs=(ens / k_total).float(), aleatoric=(aleatoric / k_total).float(),
        sample_correct=correct, sample_nll=nll.float(), mean_probs=mean_probs, sample_probs=kept,
        mean_logits=(logit_sum / k_total).float(), rechecked=rechecked,
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
