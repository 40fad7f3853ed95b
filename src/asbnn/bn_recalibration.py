"""Per-sample BatchNorm recalibration: running statistics re-estimated for each sampled network.

The paper evaluates a sampled network (one eps held fixed) with BatchNorm running statistics that
training averaged over all the networks it sampled. Those statistics fit the posterior mean's
activations, not those of a network far from it, so part of a sampled network's error - and of
the spread between sampled networks - is a mismatch of normalisation, not of weights. The second
evaluation protocol re-estimates the statistics for each sampled network before evaluating it:
the network at its eps runs a fixed, seeded set of training images in train mode (no labels, no
gradients), BatchNorm keeps the cumulative average of their batch statistics, and the network is
then evaluated in eval mode with those statistics. The same eps and the same images give the same
statistics, so the protocol is exactly reproducible; the trained statistics are restored after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from .adversarial import RunningStats
from .data import ArrayDataset
from .errors import ConfigError


@dataclass(frozen=True)
class Recalibration:
    """Which training images re-estimate the statistics: `batches` x `batch_size`, drawn by `seed`.

    2,000 images (10 batches of 200) estimate a 64-channel layer's mean and variance to well under
    1 % of their size; the batch size sets the batch statistics BatchNorm averages.
    """

    batches: int = 10
    batch_size: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"BatchNorm recalibration {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"BatchNorm recalibration seed must be an integer >= 0, got {self.seed!r}")

    @property
    def num_images(self) -> int:
        return self.batches * self.batch_size

    def images(self, train: ArrayDataset) -> ArrayDataset:
        """The fixed set of training images (same seed, same images, in the same order); a training
        set smaller than `num_images` is used whole."""
        idx = np.random.default_rng(self.seed).permutation(len(train))[: self.num_images]
        return ArrayDataset(images=train.images[idx], labels=train.labels[idx], classes=train.classes)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def recalibrated(net: nn.Module, eps: Tensor | Literal["mean"] | None, batches: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, `net`'s BatchNorm layers hold statistics estimated at `eps` from `batches`.

    `net` is a `Posterior` (with `eps` a flat noise tensor or "mean") or a deterministic module
    (`eps=None`). The trained running statistics, momentum and train/eval mode come back after.
    """
    model = getattr(net, "model", net)
    layers = batchnorms(model)
    trained = RunningStats(model)
    momenta = [m.momentum for m in layers]
    was_training = net.training
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average of the batch statistics, equal weight per batch
        net.train()
        with torch.no_grad():
            for x in batches:
                net(x) if eps is None else net(x, eps)
        net.eval()
        yield
    finally:
        trained.restore()
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        net.train(was_training)
