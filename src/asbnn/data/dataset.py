"""What every reader produces and hands the registry: the in-memory data set, its description,
and a located split (`Source`); with the errors a reader raises when a split is absent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asbnn.errors import DataError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and loader need to know about a data set before reading it."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop (pad 4) + horizontal flip suits CIFAR-like sets, not 28x28 digits
    classes: tuple[str, ...] | None = None  # names by label, where known without reading the data


@dataclass
class ArrayDataset:
    """A whole split in memory: uint8 images (N, H, W, C), int64 labels (N,), class names by label."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Source:
    """A located split: the paths its cache entry depends on, and how to decode it."""

    paths: tuple[Path, ...]
    decode: Callable[[], ArrayDataset]


Locator = Callable[[Path, str], Source]  # (data root, split) -> source; DataError when absent


class SplitMissing(DataError):
    """An image folder lacks the requested split (dataset_info then falls back to the other)."""


def not_found(name: str, split: str, looked: list[Path], how: str) -> DataError:
    paths = ", ".join(str(p) for p in looked)
    return DataError(f"{name} ({split}) not found; looked for {paths}. {how}, "
                     "or pass --data-root / set ASBNN_DATA to the folder that holds it")


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {bad[0]} is out of range for {num_classes} classes")
