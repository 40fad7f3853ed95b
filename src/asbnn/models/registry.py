"""Model registry: configs and the CLI name an architecture by string, so every
constructor registers itself here under a short name."""

import re
from typing import Callable

from torch import nn

from asbnn.dropout import add_dropout
from asbnn.errors import ConfigError

ModelFn = Callable[..., nn.Module]

_MODELS: dict[str, ModelFn] = {}


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator for a constructor ``fn(num_classes=10, in_channels=3) -> nn.Module``."""

    def decorator(fn: ModelFn) -> ModelFn:
        if name in _MODELS:
            raise ConfigError(f"model '{name}' is already registered")
        _MODELS[name] = fn
        return fn

    return decorator


def _natural_key(name: str) -> list[int | str]:
    # resnet20 before resnet110, as a reader expects
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_models() -> list[str]:
    return sorted(_MODELS, key=_natural_key)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    """The named architecture; `dropout` > 0 adds MC-dropout layers to it (`asbnn.dropout.add_dropout`)."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model '{name}'; valid: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
    model = _MODELS[name](num_classes=num_classes, in_channels=in_channels)
    return add_dropout(model, dropout) if dropout else model
