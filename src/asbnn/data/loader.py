"""A batched loader that keeps the whole data set on the training device, in the style of airbench.

Small image sets fit on any accelerator as uint8, so an epoch never touches the host: shuffling,
random crops, flips and normalisation are a handful of batched tensor ops per batch. All the
randomness comes from the generator handed to `batches`, so two generators seeded alike give the
same epoch bit for bit, which is what makes a resumed training run exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from asbnn.data.dataset import ArrayDataset
from asbnn.errors import ConfigError


class DeviceLoader:
    """Serves (float32 NCHW images, int64 labels) batches from device-resident uint8 data.

    With `channels_last`, multi-channel batches come in the channels-last memory layout (same
    shape and values, NHWC strides), which convolutions then keep: faster on CPUs and on GPUs in
    mixed precision. One-channel images are the same bytes either way and stay canonical NCHW.
    """

    def __init__(self, data: ArrayDataset, batch_size: int, *, train: bool, mean: Sequence[float],
                 std: Sequence[float], augment: bool, device: torch.device | str = "cpu",
                 crop_padding: int = 4, drop_last: bool = False, channels_last: bool = False) -> None:
        images, labels = data.images, data.labels
        if images.ndim != 4 or images.dtype != np.uint8 or labels.shape != (len(images),):
            raise ConfigError(f"expected uint8 images (N, H, W, C) and N labels, got {images.dtype} images of "
                              f"shape {images.shape} and labels of shape {labels.shape}")
        n, channels = len(images), images.shape[3]
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        if batch_size > n:
            raise ConfigError(f"batch size {batch_size} is larger than the data set ({n} samples)")
        if crop_padding < 0:
            raise ConfigError(f"crop padding must be >= 0, got {crop_padding}")
        mean_t, std_t = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
        if (std_t <= 0).any():
            raise ConfigError(f"std must be positive, got {tuple(std)}")

        self.device = torch.device(device)
        self.batch_size, self.train, self.drop_last = batch_size, train, drop_last
        self.augment, self.crop_padding = augment and train, crop_padding
        self.memory_format = torch.channels_last if channels_last and channels > 1 else torch.contiguous_format
        # np.require copies read-only arrays, which torch.from_numpy would warn about.
        host = torch.from_numpy(np.require(images, requirements=["C", "W"]))
        # Copy into canonical NCHW strides: for one channel, permute().contiguous() keeps strides that
        # also read as channels_last, which sends conv and BatchNorm down a ~2x slower CPU path.
        nchw = host.permute(0, 3, 1, 2)
        self.images = torch.empty(nchw.shape, dtype=torch.uint8, device=self.device).copy_(nchw)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(self.device)
        # (x / 255 - mean) / std folded into one multiply-add.
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).view(1, -1, 1, 1).to(self.device)

    def __len__(self) -> int:
        """Batches per epoch."""
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.labels.shape[0]

    def batches(self, generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch: shuffled and augmented when training, in stored order and untouched otherwise."""
        if generator is not None and generator.device.type != self.device.type:
            raise ConfigError(f"the generator lives on {generator.device}, the loader's data on {self.device}")
        n, size = self.num_samples, self.batch_size
        if self.train:
            order = torch.randperm(n, generator=generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        if self.augment:  # drawn for the whole epoch up front, one offset pair and flip per position
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator, device=self.device)
            flips = torch.rand(n, generator=generator, device=self.device) < 0.5
        for start in range(0, len(self) * size, size):
            index = order[start:start + size]
            images = self.images[index]
            if self.augment:
                images = self._crop_flip(images, offsets[start:start + size], flips[start:start + size])
            images = images.to(torch.float32, memory_format=self.memory_format)
            yield images.mul_(self._scale).add_(self._shift), self.labels[index]

    def _crop_flip(self, images: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
        """Each image's window at `offsets` in its zero-padded copy, mirrored where `flips`: one gather."""
        b, c, h, w = images.shape
        pad = self.crop_padding
        padded = F.pad(images, (pad, pad, pad, pad)).view(b, c, -1)
        cols = torch.arange(w, device=self.device)
        cols = torch.where(flips[:, None], cols.flip(0), cols) + offsets[:, 1:]  # (B, W)
        rows = torch.arange(h, device=self.device) + offsets[:, :1]  # (B, H)
        flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(b, 1, h * w)
        return padded.gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


def _per_channel(values: Sequence[float], channels: int, what: str) -> Tensor:
    try:
        tensor = torch.as_tensor(tuple(values), dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"{what} must be a sequence of numbers, got {values!r}") from None
    if tensor.numel() != channels:
        raise ConfigError(f"{what} needs one value per channel ({channels}), got {tuple(values)}")
    return tensor


#: Images per batch when evaluating: large enough to keep any device busy, small enough for any memory.
EVAL_BATCH = 500


def eval_loader(data: ArrayDataset, mean: Sequence[float], std: Sequence[float], *,
                device: torch.device | str = "cpu", channels_last: bool = False) -> DeviceLoader:
    """The data in stored order, unaugmented, in batches of `EVAL_BATCH` (fewer for a smaller set)."""
    return DeviceLoader(data, min(EVAL_BATCH, len(data.labels)), train=False, mean=mean, std=std, augment=False,
                        device=device, channels_last=channels_last)
