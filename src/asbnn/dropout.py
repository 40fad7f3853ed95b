"""MC dropout (Gal & Ghahramani, 2016) as a method beside VI and AS: dropout for any registry model.

`add_dropout(model, p)` drops the inputs of every conv and linear layer but the first (the image
itself is never dropped), through forward pre-hooks: the model's modules and state-dict keys stay
exactly those of the plain model, so a run with `dropout: 0` is the plain model. In training mode
each hook is inverted dropout drawn per input and per feature, whole channels of a conv input (as
`nn.Dropout2d`), from a generator the training loop seeds per epoch (a resumed run replays it). In
eval mode without a mask it does nothing: the usual "weight-scaling" network, the counterpart of
the posterior mean.

A *sampled network* of MC dropout is one Bernoulli mask per dropped layer, drawn per input feature
or channel (not per input and not per pixel) from a seeded generator and held fixed over the whole
test set, so that, like one eps of a posterior, the same network classifies every test input; it is
one draw of the distribution training sampled from for each input. (The common alternative, a fresh
mask per input and forward pass, makes a "sampled network" a different network for every input.)
`MCDropout` gives a network the interface `evaluate` uses for posteriors: `sample_eps(generator)`
draws all masks as one flat tensor, `net(x, masks)` runs it and `net(x, "mean")` runs without masks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import ConfigError


class DropoutHook:
    """The forward pre-hook that drops the input of one layer (see the module docstring)."""

    def __init__(self, p: float, features: int) -> None:
        self.p = p
        self.features = features  # input channels (conv) or input features (linear): the mask's size
        # per feature: mask / (1 - p) of one sampled network, or ones for the mean network; None: unset
        self.scale: Tensor | None = None
        self.generator: torch.Generator | None = None  # the training draws; None: torch's global generator

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        (x,) = inputs
        if self.scale is not None:  # a fixed network, in either mode (BatchNorm recalibration trains)
            shape = (1, -1) + (1,) * (x.dim() - 2) if isinstance(module, nn.Conv2d) else (-1,)
            return (x * self.scale.view(shape).to(x.dtype),)
        if module.training:  # per input, whole channels of a conv input (as nn.Dropout2d)
            shape = x.shape[:2] + (1,) * (x.dim() - 2) if isinstance(module, nn.Conv2d) else x.shape
            keep = torch.bernoulli(x.new_full(shape, 1 - self.p), generator=self.generator)
            return (x * keep / (1 - self.p),)
        return (x,)


def add_dropout(model: nn.Module, p: float) -> nn.Module:
    """Drop the inputs of every conv and linear layer of `model` but the first, with rate p (in place)."""
    if not 0 < p < 1:
        raise ConfigError(f"dropout must be in (0, 1), got {p}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers[1:]:
        features = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
        layer.register_forward_pre_hook(DropoutHook(p, features))
    return model


def dropout_hooks(model: nn.Module) -> list[DropoutHook]:
    """The dropout hooks of a model, in module order (empty for a model without dropout)."""
    return [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, DropoutHook)]


def set_training_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Draw the training-mode dropout of `model` from `generator` (the epoch's seeded stream)."""
    for hook in dropout_hooks(model):
        hook.generator = generator


class MCDropout(nn.Module):
    """A network with dropout hooks seen as a distribution over networks: one flat mask per sample."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hooks = dropout_hooks(model)
        if not self.hooks:
            raise ConfigError("MC dropout needs a model with dropout layers (add_dropout, or dropout > 0)")

    def sample_eps(self, generator: torch.Generator) -> Tensor:
        """One sampled network: a 0/1 mask per dropped layer and feature, concatenated ([sum of features])."""
        size = sum(h.features for h in self.hooks)
        keep = torch.full((size,), 1 - self.hooks[0].p, device=generator.device)
        return torch.bernoulli(keep, generator=generator)

    def forward(self, x: Tensor, eps: Tensor | str | None = None) -> Tensor:
        """`eps` a flat mask from `sample_eps`: that network; "mean": no dropout, in either mode;
        None: the model as it is (fresh dropout in training mode, none in eval mode)."""
        if eps is None:
            return self.model(x)
        if isinstance(eps, str):
            scales = [torch.ones(h.features, device=x.device) for h in self.hooks]
        else:
            scales = [m / (1 - h.p) for h, m in zip(self.hooks, eps.split([h.features for h in self.hooks]))]
        try:
            for hook, scale in zip(self.hooks, scales):
                hook.scale = scale
            return self.model(x)
        finally:
            for hook in self.hooks:
                hook.scale = None
