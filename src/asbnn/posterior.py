"""A mean-field Gaussian posterior over the parameters of any `nn.Module`.

Each Bayesian weight is w = mu + sigma(rho) * eps with eps ~ N(0, 1). All Bayesian parameters are
packed into one flat `mu` and one flat `rho` vector, so drawing every weight of the network, the
closed-form KL and an Adversarial-Sampling sign step are each one fused tensor operation, and a
sample of the whole network is just one flat `eps` tensor that can be held fixed, differentiated
or batched.

The posterior works on its own deep copy of the module (`posterior.model`); the caller's module is
never changed. The copy's layers are not rewritten: a forward pass calls it through
`torch.func.functional_call` with the sampled weights. Deterministic parameters (those not chosen
as Bayesian) and buffers such as BatchNorm running statistics stay ordinary members of the copy;
its Bayesian slots hold empty placeholders, so calling `posterior.model` directly is refused.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigError, check_number

SigmaParam = Literal["exp", "softplus"]

#: Layer types whose parameters are Bayesian by default: conv, linear and BatchNorm affine.
DEFAULT_BAYESIAN_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
)


@dataclass(frozen=True)
class PosteriorConfig:
    """How the posterior is parameterised and initialised.

    `init_sigma` is the standard deviation every weight starts with. The authors' code passes
    0.15 as rho with sigma = exp(rho), i.e. init_sigma = exp(0.15) ~ 1.16 (the `paper` preset).
    """

    sigma_param: SigmaParam = "exp"
    init_sigma: float = 0.05
    prior_sigma: float = 0.15
    mu_init: Literal["module", "paper"] = "module"

    def __post_init__(self) -> None:
        if self.sigma_param not in ("exp", "softplus"):
            raise ConfigError(f"sigma_param must be 'exp' or 'softplus', got {self.sigma_param!r}")
        check_number("init_sigma", self.init_sigma, positive=True)
        check_number("prior_sigma", self.prior_sigma, positive=True)
        if not 0 < self.prior_sigma * self.prior_sigma < math.inf:  # the KL divides by prior_sigma^2
            raise ConfigError(f"prior_sigma must have a finite square > 0, got {self.prior_sigma!r}")
        if self.mu_init not in ("module", "paper"):
            raise ConfigError(f"mu_init must be 'module' or 'paper', got {self.mu_init!r}")


def sigma_from_rho(rho: Tensor, sigma_param: SigmaParam) -> Tensor:
    return rho.exp() if sigma_param == "exp" else F.softplus(rho)


def rho_from_sigma(sigma: float, sigma_param: SigmaParam) -> float:
    if sigma_param == "exp":
        return math.log(sigma)
    # softplus^-1; above 40, log(e^s - 1) is s to double precision (and expm1 overflows past ~709)
    return sigma if sigma > 40 else math.log(math.expm1(sigma))


def gaussian_kl(mu: Tensor, sigma: Tensor, prior_sigma: float) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, prior_sigma^2)), summed over all elements."""
    return (
        math.log(prior_sigma) - sigma.log() + (sigma.square() + mu.square()) / (2 * prior_sigma**2) - 0.5
    ).sum()


class _ExpSigmaKL(torch.autograd.Function):
    """sum(-rho + (exp(2 rho) + mu^2) / (2 prior_var)), the non-constant part of the KL for
    sigma = exp(rho), with its gradient: d/dmu = mu / prior_var, d/drho = exp(2 rho) / prior_var - 1."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # sums of millions: never in bf16
    def forward(ctx, mu: Tensor, rho: Tensor, prior_var: float) -> Tensor:  # type: ignore[override]
        var = (2 * rho).exp_()
        ctx.save_for_backward(mu, var)
        ctx.prior_var = prior_var
        return (var.sum() + torch.dot(mu, mu)) / (2 * prior_var) - rho.sum()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        mu, var = ctx.saved_tensors
        scale = grad / ctx.prior_var
        return mu * scale, var.mul(scale).sub_(grad), None


#: Normalisation layers: under mu_init="paper" their gains start at U(0, 1) and their biases at 0.
_NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


class _Shared(NamedTuple):
    """One Bayesian tensor and every (name, owning module) it appears under; the first name keys it."""

    param: nn.Parameter
    owners: list[tuple[str, nn.Module]]


def _bayesian_tensors(
    model: nn.Module, include: Sequence[str], exclude: Sequence[str], layer_types: tuple[type[nn.Module], ...],
) -> list[_Shared]:
    """The tensors that become Bayesian, in `named_parameters` order.

    A tensor shared between layers (tied weights, a module registered under two names) is one
    parameter, so it gets one mu / rho and one sample used everywhere. It is chosen when any of its
    names is (by layer type or an `include` glob) and none matches an `exclude` glob.
    """
    for label, patterns in (("include", include), ("exclude", exclude)):
        if isinstance(patterns, str):  # would be read letter by letter, matching nothing
            raise ConfigError(f"{label} takes a list of globs, got the string {patterns!r}; write [{patterns!r}]")
    found: dict[int, _Shared] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            found.setdefault(id(param), _Shared(param, [])).owners.append((full, module))

    def matches(names: list[str], patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for name in names for pattern in patterns)

    chosen = []
    for shared in found.values():
        names = [name for name, _ in shared.owners]
        wanted = any(isinstance(m, layer_types) for _, m in shared.owners) or matches(names, include)
        if wanted and shared.param.requires_grad and shared.param.numel() > 0 and not matches(names, exclude):
            chosen.append(shared)
    return chosen


def select_parameters(
    model: nn.Module,
    exclude: Sequence[str] = (),
    layer_types: tuple[type[nn.Module], ...] = DEFAULT_BAYESIAN_LAYERS,
    *,
    include: Sequence[str] = (),
) -> list[str]:
    """Names of the parameters that become Bayesian, one per tensor: those of `layer_types` or
    matching an `include` glob, minus `exclude` globs."""
    return [shared.owners[0][0] for shared in _bayesian_tensors(model, include, exclude, layer_types)]


def _paper_init(name: str, module: nn.Module, param: Tensor) -> Tensor:
    """The authors' mean initialisation, extended to every kind of parameter.

    Theirs: U(+-1/sqrt(fan_in)) for conv / linear weights and biases, BatchNorm weight U(0, 1) and
    bias 0. Other norm layers are treated like BatchNorm, other biases start at 0, other weight
    tensors at U(+-1/sqrt(fan_in)) with fan_in the size of one output slice. A vector or scalar
    outside these (a PReLU slope, a free scale) has no natural rule and is refused.
    """
    leaf = name.rpartition(".")[2]
    if isinstance(module, _NORM_LAYERS):
        return torch.rand_like(param) if leaf == "weight" else torch.zeros_like(param)
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        fan_in = module.weight[0].numel()
    elif "bias" in leaf:
        return torch.zeros_like(param)
    elif param.dim() >= 2:
        fan_in = param[0].numel()
    else:
        raise ConfigError(f"mu_init='paper' has no rule for {name} ({type(module).__name__}, shape "
                          f"{list(param.shape)}); use mu_init='module' or exclude it")
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty_like(param).uniform_(-bound, bound)


def _check_one_dtype_and_device(names: list[str], params: list[Tensor]) -> None:
    """mu is one flat tensor: refuse a mix of dtypes or devices by name rather than cast silently."""
    first = params[0]
    for name, param in zip(names, params):
        if not param.dtype.is_floating_point:
            raise ConfigError(f"Bayesian parameters must be real floating point; {name} is {param.dtype}")
        if (param.dtype, param.device) != (first.dtype, first.device):
            raise ConfigError(f"Bayesian parameters must share one dtype and device: {names[0]} is {first.dtype} on "
                              f"{first.device}, {name} is {param.dtype} on {param.device}; exclude one or convert the module")


#: Attribute of a posterior's copy naming its first Bayesian slot (and marking it as wrapped).
_SLOT = "_posterior_slot"


def _copy_without(model: nn.Module, chosen: list[_Shared]) -> nn.Module:
    """A deep copy of `model` whose Bayesian slots hold empty, non-persistent placeholder buffers.

    The Bayesian tensors themselves are not copied (mu holds their values): deepcopy's memo maps
    each to its placeholder. `functional_call` fills the slots; a direct call is refused.
    """
    memo: dict[int, Any] = {id(s.param): torch.empty(0, dtype=s.param.dtype, device=s.param.device) for s in chosen}
    try:
        clone = copy.deepcopy(model, memo)
    except (TypeError, RuntimeError, copy.Error) as err:
        raise ConfigError(f"Posterior works on its own copy of the module, and this {type(model).__name__} "
                          f"cannot be deep-copied: {err}") from None
    for shared in chosen:
        for name, _ in shared.owners:
            module_name, _, leaf = name.rpartition(".")
            module = clone.get_submodule(module_name)
            if leaf in module._parameters:  # a module registered under two names is met twice
                module.register_buffer(leaf, module._parameters.pop(leaf), persistent=False)
    setattr(clone, _SLOT, chosen[0].owners[0][0])
    clone.register_forward_pre_hook(_refuse_direct_call)
    return clone


def _refuse_direct_call(model: nn.Module, args: tuple[Any, ...]) -> None:
    """`posterior.model(x)` outside `functional_call` would run empty placeholders: say what to call."""
    slot: Any = model
    for part in getattr(model, _SLOT).split("."):
        slot = getattr(slot, part)
    if slot.numel() == 0:
        raise ConfigError("posterior.model holds no Bayesian weights of its own (they live in the posterior's mu): "
                          "call posterior(x, eps), or load posterior.mean_state_dict() into a plain model")


class Posterior(nn.Module):
    """Mean-field Gaussian posterior over chosen parameters of `model`.

    `posterior(x, eps)` runs the model with weights mu + sigma * eps; `eps=None` draws a fresh
    sample, `eps="mean"` uses the posterior mean. `eps` is one flat tensor of `num_bayesian`
    elements (see `sample_eps`), so it can be held fixed over a test set or differentiated.

    Bayesian are the parameters of `layer_types` and those whose name matches an `include` glob,
    minus those matching an `exclude` glob. mu and rho take the parameters' dtype. `model` is left
    untouched: the posterior runs its own copy, `posterior.model` (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        config: PosteriorConfig = PosteriorConfig(),
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        layer_types: tuple[type[nn.Module], ...] = DEFAULT_BAYESIAN_LAYERS,
    ) -> None:
        super().__init__()
        if any(isinstance(m, Posterior) or hasattr(m, _SLOT) for m in model.modules()):
            raise ConfigError("this module is already wrapped: it is (or contains) a Posterior or its `model`, whose "
                              "Bayesian weights live in that posterior's mu; wrap the original module instead")
        chosen = _bayesian_tensors(model, include, exclude, layer_types)
        if not chosen:
            raise ConfigError("no Bayesian parameters selected: check `include`, `exclude` and `layer_types`")
        self.config = config
        self.names = [shared.owners[0][0] for shared in chosen]
        #: Further names of shared tensors (tied weights), each mapped to the name that keys its mu.
        self.aliases = {alias: shared.owners[0][0] for shared in chosen for alias, _ in shared.owners[1:]}
        params = [shared.param for shared in chosen]
        _check_one_dtype_and_device(self.names, params)
        initial = [
            _paper_init(name, shared.owners[0][1], shared.param) if config.mu_init == "paper" else shared.param.detach()
            for name, shared in zip(self.names, chosen)
        ]
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        flat = torch.cat([value.reshape(-1) for value in initial])
        self.mu = nn.Parameter(flat)
        rho0 = rho_from_sigma(config.init_sigma, config.sigma_param)
        self.rho = nn.Parameter(torch.full_like(flat, rho0))
        self.model = _copy_without(model, chosen)

    @property
    def num_bayesian(self) -> int:
        return self.mu.numel()

    def sigma(self) -> Tensor:
        return sigma_from_rho(self.rho, self.config.sigma_param)

    def kl(self) -> Tensor:
        """Closed-form KL of the posterior from the prior N(0, prior_sigma^2), summed.

        With sigma = exp(rho), log sigma is rho itself and the gradient is written out by hand: a
        few passes over the parameters instead of a dozen (it matters for VGG-16's 15 M weights).
        Summed in at least float32 (a no-op for float32 and float64 modules).
        """
        dtype = torch.promote_types(self.mu.dtype, torch.float32)
        mu, rho = self.mu.to(dtype), self.rho.to(dtype)
        if self.config.sigma_param != "exp":
            return gaussian_kl(mu, sigma_from_rho(rho, self.config.sigma_param), self.config.prior_sigma)
        constant = self.num_bayesian * (math.log(self.config.prior_sigma) - 0.5)
        return constant + _ExpSigmaKL.apply(mu, rho, self.config.prior_sigma**2)

    def sample_eps(self, generator: torch.Generator | None = None, num_samples: int | None = None) -> Tensor:
        """Standard-normal noise for one sample (shape [P]) or `num_samples` samples ([S, P])."""
        shape = (self.num_bayesian,) if num_samples is None else (num_samples, self.num_bayesian)
        return torch.randn(shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)

    def check_flat(self, tensor: object, name: str = "eps") -> None:
        """Refuse a flat eps or weight vector that does not fit mu, so that a wrong length fails here
        instead of broadcasting unnoticed. Metadata only: no device sync."""
        mu = self.mu
        if isinstance(tensor, Tensor) and (tensor.shape, tensor.dtype, tensor.device) == (mu.shape, mu.dtype, mu.device):
            return
        got = f"{tensor.dtype} [{', '.join(map(str, tensor.shape))}] on {tensor.device}" if isinstance(tensor, Tensor) \
            else type(tensor).__name__
        raise ConfigError(f"{name} must be a {mu.dtype} tensor of shape [{self.num_bayesian}] on {mu.device} "
                          f"(see sample_eps), got {got}")

    def flat_weights(self, eps: Tensor | Literal["mean"]) -> Tensor:
        if isinstance(eps, str):
            if eps != "mean":
                raise ConfigError(f"eps must be a tensor, None or 'mean', got {eps!r}")
            return self.mu
        self.check_flat(eps)
        return torch.addcmul(self.mu, self.sigma(), eps)

    def weights(self, eps: Tensor | Literal["mean"]) -> dict[str, Tensor]:
        """The sampled Bayesian weights keyed by parameter name (tied names too), ready for `functional_call`."""
        return self._by_name(self.flat_weights(eps))

    def _by_name(self, flat: Tensor) -> dict[str, Tensor]:
        named = {n: w.view(s) for n, w, s in zip(self.names, flat.split(self.sizes), self.shapes)}
        for alias, name in self.aliases.items():
            named[alias] = named[name]
        return named

    def forward(
        self, x: Tensor, eps: Tensor | Literal["mean"] | None = None, *, weights: Tensor | None = None,
    ) -> Tensor:
        """The network at mu + sigma * eps, or at flat `weights` the caller has already formed."""
        if weights is None:
            weights = self.flat_weights(self.sample_eps() if eps is None else eps)
        elif eps is not None:
            raise ConfigError("pass either eps or weights, not both")
        else:
            self.check_flat(weights, "weights")
        return functional_call(self.model, self._by_name(weights), (x,), strict=False)

    def mean_state_dict(self) -> dict[str, Tensor]:
        """The wrapped model's state dict with the Bayesian weights set to their means.

        Loadable into a fresh copy of the deterministic model (export, or a warm start).
        """
        state = dict(self.model.state_dict())
        state.update({n: w.detach().clone() for n, w in self.weights("mean").items()})
        return state
