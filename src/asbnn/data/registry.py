"""The data set registry: names to readers, and the public entry points that find, decode (once,
through the array cache) and describe a data set or an image folder."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asbnn.data import cache
from asbnn.data.cifar import CIFAR10_LAYOUT, CIFAR100_LAYOUT, CIFAR_MEAN, CIFAR_STD, cifar_locator
from asbnn.data.dataset import SPLITS, ArrayDataset, DatasetInfo, Locator, SplitMissing
from asbnn.data.folders import CIFAR10_CLASSES, FolderSpec, locate_folder
from asbnn.data.idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, idx_locator
from asbnn.data.svhn import locate_svhn
from asbnn.data.tiny_imagenet import locate_tiny
from asbnn.errors import AsbnnError, ConfigError, DataError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def dataset_info(name: str) -> DatasetInfo:
    """A registered set's fixed description, or one inferred from an image folder (decoding it once)."""
    if name in _REGISTRY:
        return _REGISTRY[name].info
    try:
        data = load_dataset(name, "train")
    except SplitMissing:
        data = load_dataset(name, "test")
    _, height, width, channels = data.images.shape
    if height != width:
        raise DataError(f"{name}: images must be square, found {width}x{height}")
    mean, std = _channel_stats(data.images)
    return DatasetInfo(name, len(data.classes), channels, height, mean, std, augment=channels == 3)


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: the flag if given, else $ASBNN_DATA, else ~/.cache/asbnn/data."""
    if root is None or str(root) == "":
        root = os.environ.get("ASBNN_DATA") or Path.home() / ".cache" / "asbnn" / "data"
    return Path(root).expanduser().absolute()


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> ArrayDataset:
    """One split of a registered data set found under `root`, or of an image folder/archive `name`."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if name in _REGISTRY:
        source, tag = _REGISTRY[name].locate(resolve_data_root(root), split), f"{name}-{split}"
    else:
        path = _folder_path(name)
        source, tag = locate_folder(path, split, FolderSpec()), f"folder-{path.name}-{split}"
    arrays = cache.cached(tag, source.paths, lambda: _to_arrays(source.decode()))
    return ArrayDataset(arrays["images"], arrays["labels"], arrays["classes"].tolist())


def dataset_classes(dataset: str, data_root: str | None = None) -> list[str] | None:
    """Class names of a data set: fixed for most registered sets, else read from its files
    (None where they are not on this machine)."""
    if dataset in _FIXED_CLASSES:
        return list(_FIXED_CLASSES[dataset])
    try:
        return load_dataset(dataset, "test", data_root).classes
    except AsbnnError:
        return None


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    locate: Locator


def looks_like_path(name: str) -> bool:
    """Whether `name` means an image folder or archive (which need not be there now), not a registered name."""
    if "/" in name or os.sep in name or name.startswith("~") or name.endswith(ARCHIVE_SUFFIXES):
        return True
    try:
        return Path(name).exists()
    except (OSError, ValueError):  # a name no file system takes (too long, a NUL)
        return False


def _folder_path(name: str) -> Path:
    """`name` as an image-folder path; a name that does not look like a path is an unknown data set."""
    path = Path(name).expanduser()
    if not looks_like_path(name):
        raise ConfigError(f"unknown data set {name!r}; valid names: {', '.join(list_datasets())}, "
                          "or the path of an image folder or .tar.gz of one")
    if not path.exists():
        raise DataError(f"image folder {path} does not exist (expected <split>/<class>/*.jpg|png inside)")
    return path.absolute()


def _to_arrays(data: ArrayDataset) -> cache.Arrays:
    return {"images": data.images, "labels": data.labels, "classes": np.array(data.classes, dtype=str)}


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of pixels scaled to [0, 1], from 256-bin histograms (no float copy)."""
    values = np.arange(256) / 255.0
    means, stds = [], []
    for channel in range(images.shape[3]):
        counts = np.bincount(images[..., channel].ravel(), minlength=256)
        mean = float(counts @ values / counts.sum())
        std = math.sqrt(float(counts @ (values - mean) ** 2 / counts.sum()))
        means.append(round(mean, 4))
        stds.append(round(std, 4) or 1.0)  # constant images: leave the scale alone
    return tuple(means), tuple(stds)


_REGISTRY: dict[str, _Entry] = {
    "cifar10": _Entry(DatasetInfo("cifar10", 10, 3, 32, CIFAR_MEAN, CIFAR_STD, augment=True),
                      cifar_locator("cifar10", CIFAR10_LAYOUT, jpeg_fallback=True)),
    "cifar100": _Entry(DatasetInfo("cifar100", 100, 3, 32, CIFAR_MEAN, CIFAR_STD, augment=True),
                       cifar_locator("cifar100", CIFAR100_LAYOUT, jpeg_fallback=False)),
    "fashion-mnist": _Entry(DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), augment=False),
                            idx_locator("fashion-mnist", "fashion-mnist", FASHION_MNIST_CLASSES,
                                         "https://github.com/zalandoresearch/fashion-mnist")),
    "mnist": _Entry(DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), augment=False),
                    idx_locator("mnist", "mnist", MNIST_CLASSES, "http://yann.lecun.com/exdb/mnist/")),
    # street-view digits: no flips (they would mirror digits); the usual OOD set for CIFAR models
    "svhn": _Entry(DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                               augment=False), locate_svhn),
    # 32x32 natural images like CIFAR's; only ever evaluated, as out-of-distribution data.
    "tiny-imagenet-val": _Entry(DatasetInfo("tiny-imagenet-val", 200, 3, 32, CIFAR_MEAN, CIFAR_STD, augment=True),
                                locate_tiny),
}

_FIXED_CLASSES = {"cifar10": CIFAR10_CLASSES, "fashion-mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}
