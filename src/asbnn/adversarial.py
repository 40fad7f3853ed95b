"""Adversarial Sampling (Zhang et al., AAAI 2022, Algorithm 1) as plain functions.

`bayes_loss` is the whole training objective of eq. 3,

    (1 - lambda) * L_p(eps) + lambda * L_adv(eps_adv) + kl_weight * KL,

with eps_adv found by `adversarial_eps`: N sign-gradient steps of size alpha on the noise, which
is the same as w_adv += alpha * sigma * sign(dL/dw). lambda = 0 is plain VI. Both functions take
any `Posterior` and a batch, so they drop into a user's own training loop.

BatchNorm policy during the adversarial passes (`bn_policy`):
- "freeze" (our default): the N search passes and the L_adv pass normalise with batch statistics
  as usual but do not update the running statistics, so those describe regularly sampled
  networks only (the ones evaluated at test time).
- "update" (the authors' code): every pass updates the running statistics.

On how much of the batch the search runs (`search_fraction`): the N search passes may use only the
first share of each (shuffled) batch, L_adv and L_p still all of it: a step then costs
N x fraction + 2 passes. eps is one draw for the whole network, not one per image, so a smaller
batch still finds a direction of the same dimension, only from a noisier gradient.

Which noise the sign steps move (`layers`):
- "all" (the paper): the noise of every Bayesian parameter.
- "normalised": only the noise of BatchNorm layers and of the conv / linear layers that feed
  straight into one. In a linear layer dL/dw_ij = delta_j x_i, so a sign step moves unit j's
  pre-activation coherently by alpha * sum_i sigma_ij |x_i| over all its inputs; a BatchNorm right
  after the layer subtracts such a per-channel shift (batch statistics in train mode), an
  unnormalised layer (LeNet-5's fc1, 400 inputs) passes it on. See `normalised_mask`.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, check_number, first_line
from .posterior import Posterior

LossFn = Callable[[Tensor, Tensor], Tensor]
BNPolicy = Literal["freeze", "update"]
KLConvention = Literal["paper", "authors"]
ASLayers = Literal["all", "normalised"]


def _check_search(steps: object, step_size: object) -> None:
    """N and alpha of the adversarial search, for ASConfig and direct calls of `adversarial_eps` alike."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ConfigError(f"as_steps (N) must be an integer, got {steps!r}")
    if steps < 0:
        raise ConfigError(f"as_steps (N) must be >= 0, got {steps}")
    check_number("as_step_size (alpha)", step_size)


@dataclass(frozen=True)
class ASConfig:
    """Adversarial Sampling settings; the defaults are the paper's (N=5, alpha=0.02, lambda=0.8).

    kl_convention "paper" adds the KL unscaled (eq. 3); "authors" multiplies it by (1 - lambda)
    as the authors' code does, which removes the KL entirely at lambda = 1. layers "normalised"
    restricts the sign steps to the noise of normalised layers, search_fraction < 1 runs them on
    that share of the batch (see the module docstring).
    """

    steps: int = 5
    step_size: float = 0.02
    lam: float = 0.8
    kl_convention: KLConvention = "paper"
    bn_policy: BNPolicy = "freeze"
    layers: ASLayers = "all"
    search_fraction: float = 1.0

    def __post_init__(self) -> None:
        _check_search(self.steps, self.step_size)
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"as_lambda must be in [0, 1], got {self.lam}")
        if self.kl_convention not in ("paper", "authors"):
            raise ConfigError(f"kl_convention must be 'paper' or 'authors', got {self.kl_convention!r}")
        if self.bn_policy not in ("freeze", "update"):
            raise ConfigError(f"bn_policy must be 'freeze' or 'update', got {self.bn_policy!r}")
        if self.layers not in ("all", "normalised"):
            raise ConfigError(f"as_layers must be 'all' or 'normalised', got {self.layers!r}")
        check_number("as_search_fraction", self.search_fraction)
        if not 0.0 < self.search_fraction <= 1.0:
            raise ConfigError(f"as_search_fraction must be in (0, 1], got {self.search_fraction}")

    def search_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The part of a batch the sign steps see: its first ceil(fraction x size) examples (at least one)."""
        if self.search_fraction == 1.0:
            return x, y
        size = max(1, math.ceil(self.search_fraction * len(x)))
        return x[:size], y[:size]


VI = ASConfig(lam=0.0)


class RunningStats:
    """A copy of every BatchNorm running statistic of `model`, to put back later.

    BatchNorm modules are found by type, so any model's own norm layers count whatever their names.
    """

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.clone() for b in self.buffers]

    def restore(self) -> None:
        # Through `.data`, as BatchNorm's own updates: a pass whose backward is still to come saved
        # these buffers, and a tracked write would invalidate it (batch statistics are what it uses).
        for buffer, saved in zip(self.buffers, self.saved):
            buffer.data.copy_(saved)


@contextmanager
def frozen_bn_stats(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Normalise with batch statistics but leave every BatchNorm's running statistics as they were.

    In train mode BatchNorm normalises with the batch's own statistics whether or not it then updates
    its running ones, so the block computes what it would anyway; the updates are undone after it.
    The modules themselves are never changed, which keeps compiled graphs valid.
    """
    if not enabled:
        yield
        return
    stats = RunningStats(model)
    try:
        yield
    finally:
        stats.restore()


_WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
_BATCHNORM = nn.modules.batchnorm._BatchNorm


def feeds_only_batchnorm(node: torch.fx.Node, model: nn.Module) -> bool:
    """Whether the output of `node` goes into one BatchNorm call as its sole input, and nowhere else
    (a residual branch or a second reader would see the shift before it is normalised away). Also
    what `evaluate.FoldedNetwork` folds: a convolution whose output only a BatchNorm reads."""
    if len(node.users) != 1:
        return False
    (user,) = node.users
    return (user.op == "call_module" and isinstance(model.get_submodule(str(user.target)), _BATCHNORM)
            and user.args == (node,) and not user.kwargs)


def _normalised_modules(model: nn.Module) -> set[int]:
    """The ids of the modules of `model` whose output is normalised: every BatchNorm, and each conv /
    linear layer every call of which feeds straight into a BatchNorm (a layer called twice counts
    only if both calls do). Found on the graph torch.fx traces, as `evaluate.FoldedNetwork` folds."""
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception as err:  # fx fails in many ways on untraceable code (data-dependent control flow, ...)
        raise ConfigError(f"as_layers 'normalised' needs a model torch.fx can trace to find its normalised "
                          f"layers; this {type(model).__name__} is not: {first_line(err)}") from None
    verdicts: dict[int, list[bool]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(str(node.target))
        if isinstance(module, (_BATCHNORM, *_WEIGHTED_LAYERS)):
            normalised = isinstance(module, _BATCHNORM) or feeds_only_batchnorm(node, model)
            verdicts.setdefault(id(module), []).append(normalised)
    return {key for key, flags in verdicts.items() if all(flags)}


def _layer_mask(posterior: Posterior) -> Tensor:
    """1 for each Bayesian parameter of a normalised layer, 0 elsewhere, in the layout of mu. A tensor
    shared between layers (tied weights) counts only if all of them are normalised."""
    model = copy.deepcopy(posterior.model)  # tracing runs the model's Python code: never on the one in use
    normalised = _normalised_modules(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    owners = {name: [name] for name in posterior.names}
    for alias, name in posterior.aliases.items():
        owners[name].append(alias)
    flags = [all(id(modules[owner.rpartition(".")[0]]) in normalised for owner in owners[name])
             for name in posterior.names]
    if not any(flags):
        raise ConfigError(f"as_layers 'normalised': this {type(model).__name__} has no Bayesian BatchNorm layer and "
                          "no conv / linear layer feeding straight into one, so AS would move no noise at all "
                          "(plain VI at N + 2 times the cost); use as_layers 'all' or method vi")
    mu = posterior.mu
    mask = torch.tensor(flags, dtype=mu.dtype).repeat_interleave(torch.tensor(posterior.sizes))
    return mask.to(mu.device)


#: Masks by posterior (keyed by its own copy of the module, which a torch.compile wrapper shares).
_MASKS: weakref.WeakKeyDictionary[nn.Module, Tensor] = weakref.WeakKeyDictionary()


def normalised_mask(posterior: Posterior) -> Tensor:
    """The flat 0/1 mask (layout of mu) of the noise a sign step may move under layers "normalised":
    that of BatchNorm layers and of conv / linear layers whose output feeds directly and only into a
    BatchNorm, whose per-channel shift that BatchNorm removes in train mode.

    Traced once per posterior and cached, following mu to another device or dtype. Raises ConfigError
    for a model torch.fx cannot trace and for one without a normalised layer.
    """
    key, mu = posterior.model, posterior.mu
    mask = _MASKS.get(key)
    if mask is None:
        mask = _layer_mask(posterior)
    elif (mask.device, mask.dtype) != (mu.device, mu.dtype):
        mask = mask.to(mu.device, mu.dtype)
    _MASKS[key] = mask
    return mask


def _search_mask(posterior: Posterior, config: ASConfig) -> Tensor | None:
    """The mask the sign steps of `config` take (None: every parameter's noise)."""
    return normalised_mask(posterior) if config.layers == "normalised" else None


def adversarial_eps(
    posterior: Posterior,
    x: Tensor,
    y: Tensor,
    eps: Tensor,
    steps: int,
    step_size: float,
    *,
    bn_policy: BNPolicy = "freeze",
    loss_fn: LossFn = F.cross_entropy,
    mask: Tensor | None = None,
) -> Tensor:
    """Algorithm 1, lines 2-6: `steps` sign-gradient ascent steps on the loss with respect to eps.

    dL/deps = sigma * dL/dw with sigma > 0, so its sign is that of the weight gradient: each pass
    differentiates with respect to the sampled weights alone (mu and sigma held fixed), which
    spares a multiplication by sigma and a fresh sigma per pass. `mask` (layout of eps, e.g.
    `normalised_mask`) multiplies each sign step: where it is 0 eps stays as drawn; None moves all.
    The returned tensor is detached.
    """
    posterior.check_flat(eps)
    if mask is not None:
        posterior.check_flat(mask, "mask")
    _check_search(steps, step_size)
    eps = eps.detach()
    if steps == 0 or step_size == 0:
        return eps
    mu, sigma = posterior.mu.detach(), posterior.sigma().detach()
    with frozen_bn_stats(posterior.model, enabled=bn_policy == "freeze"):
        for _ in range(steps):
            weights = torch.addcmul(mu, sigma, eps).requires_grad_(True)
            loss = loss_fn(posterior(x, weights=weights), y)
            (grad,) = torch.autograd.grad(loss, weights)
            step = grad.sign_() if mask is None else grad.sign_().mul_(mask)
            eps = eps.add(step, alpha=step_size)
    return eps


@dataclass
class LossParts:
    """The terms of one training step's loss; `logits` are those of the regular sample."""

    total: Tensor
    pred: Tensor
    kl: Tensor
    logits: Tensor
    adv: Tensor | None = None


def bayes_loss(
    posterior: Posterior,
    x: Tensor,
    y: Tensor,
    *,
    kl_weight: float,
    config: ASConfig = VI,
    loss_fn: LossFn = F.cross_entropy,
    generator: torch.Generator | None = None,
) -> LossParts:
    """The loss of eq. 3 on one batch; `config.lam == 0` is plain VI (no adversarial passes).

    Call `.total.backward()` on the result. Costs N + 2 forward-backward passes with AS (N x
    search_fraction + 2 with the search on part of the batch), one without.
    """
    check_number("kl_weight", kl_weight)
    eps_adv = None
    if config.lam > 0:
        eps_adv = adversarial_eps(
            posterior, *config.search_batch(x, y), posterior.sample_eps(generator), config.steps, config.step_size,
            bn_policy=config.bn_policy, loss_fn=loss_fn, mask=_search_mask(posterior, config),
        )
    return _equation_3(posterior, x, y, eps_adv, kl_weight, config, loss_fn, generator)


def _equation_3(
    posterior: Posterior, x: Tensor, y: Tensor, eps_adv: Tensor | None, kl_weight: float, config: ASConfig,
    loss_fn: LossFn, generator: torch.Generator | None,
) -> LossParts:
    """Algorithm 1, lines 7-13: L_adv at `eps_adv` (None: plain VI), L_p at a fresh sample, the KL, the total."""
    adv = None
    if eps_adv is not None:
        with frozen_bn_stats(posterior.model, enabled=config.bn_policy == "freeze"):
            adv = loss_fn(posterior(x, eps_adv), y)
    logits = posterior(x, posterior.sample_eps(generator))
    pred = loss_fn(logits, y)
    kl = posterior.kl()
    kl_scale = kl_weight * ((1 - config.lam) if config.kl_convention == "authors" else 1.0)
    total = pred + kl_scale * kl if adv is None else (1 - config.lam) * pred + config.lam * adv + kl_scale * kl
    return LossParts(total=total, pred=pred, kl=kl, logits=logits, adv=adv)


class FreeAdversarialSampler:
    """A cheaper AS: one sign step per training step, reusing that step's own backward pass.

    Standard AS spends N extra forward-backward passes per step searching for eps_adv. Here
    eps_adv is carried from one training step to the next: the gradient with respect to eps_adv
    comes for free from the backward pass of the total loss, and is applied as one sign step of
    size alpha before the next step. After `config.steps` steps eps_adv is redrawn from N(0, I),
    so it never drifts further from a regular sample than standard AS's N steps do (the same
    Wasserstein budget alpha * N). A step costs 2 forward-backward passes instead of N + 2; the
    price is that each ascent step was computed at the previous step's weights and batch
    ("free" adversarial training, Shafahi et al. 2019). `config.layers` restricts the steps as in
    standard AS.
    """

    def __init__(self, posterior: Posterior, config: ASConfig = ASConfig()) -> None:
        self.posterior, self.config = posterior, config
        _search_mask(posterior, config)  # traced (or refused) now rather than at the first sign step
        self.eps: Tensor | None = None
        self.age = 0
        self._grad: Tensor | None = None

    def _capture(self, grad: Tensor) -> None:
        self._grad = grad.detach()

    def _next_eps(self, generator: torch.Generator | None) -> Tensor:
        if self.eps is not None and self._grad is not None and self.age < self.config.steps:
            mask = _search_mask(self.posterior, self.config)
            step = self._grad.sign() if mask is None else self._grad.sign() * mask
            self.eps = self.eps.detach() + self.config.step_size * step
            self.age += 1
        else:
            self.eps, self.age = self.posterior.sample_eps(generator), 0
        self._grad = None
        eps = self.eps.detach().requires_grad_(True)
        eps.register_hook(self._capture)
        return eps

    def loss(
        self, x: Tensor, y: Tensor, *, kl_weight: float, loss_fn: LossFn = F.cross_entropy,
        generator: torch.Generator | None = None,
    ) -> LossParts:
        """Eq. 3 with the carried eps_adv; call `.total.backward()` on the result as usual."""
        check_number("kl_weight", kl_weight)  # before eps_adv takes its step
        return _equation_3(self.posterior, x, y, self._next_eps(generator), kl_weight, self.config, loss_fn, generator)

    def state_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "age": self.age, "grad": self._grad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eps, self.age, self._grad = state["eps"], state["age"], state["grad"]
