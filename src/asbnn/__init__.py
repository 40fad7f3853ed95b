"""asbnn: Bayesian neural networks trained with Adversarial Sampling (Zhang et al., AAAI 2022)."""

from .adversarial import (
    ASConfig, FreeAdversarialSampler, LossParts, adversarial_eps, bayes_loss, frozen_bn_stats, normalised_mask,
)
from .config import TrainConfig, make_config
from .errors import AsbnnError, CheckpointError, ConfigError, DataError
from .models import create_model, list_models, register_model
from .posterior import Posterior, PosteriorConfig

__all__ = [
    "ASConfig", "AsbnnError", "CheckpointError", "ConfigError", "DataError", "FreeAdversarialSampler", "LossParts",
    "Posterior", "PosteriorConfig", "TrainConfig", "adversarial_eps", "bayes_loss", "create_model",
    "frozen_bn_stats", "list_models", "make_config", "normalised_mask", "register_model",
]
__version__ = "0.1.0"
