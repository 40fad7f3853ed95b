"""The model zoo: every architecture registers itself in `registry` when imported here."""

from asbnn.models import allconv, lenet, mlp, resnet, vgg  # noqa: F401  (importing registers them)
from asbnn.models.registry import create_model, list_models, register_model

__all__ = ["register_model", "create_model", "list_models"]
