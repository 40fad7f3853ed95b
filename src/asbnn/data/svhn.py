"""SVHN: the official {train,test}_32x32.mat files (MATLAB 5, read by `matlab.read_mat`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asbnn.data.dataset import ArrayDataset, Source, not_found
from asbnn.data.matlab import read_mat
from asbnn.data.reading import reading
from asbnn.errors import DataError


_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _decode_svhn(path: Path) -> ArrayDataset:
    with reading(path):
        arrays = read_mat(path)
    images, labels = arrays.get("X"), arrays.get("y")
    if images is None or labels is None:
        raise DataError(f"{path} lacks the variables X and y of the SVHN release")
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or labels.size != images.shape[3]:
        raise DataError(f"{path}: expected X of 32x32x3xN and N labels, got X {images.shape}, y {labels.shape}")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise DataError(f"{path}: SVHN labels must be 1..10, found {labels.min()}..{labels.max()}")
    images = np.ascontiguousarray(images.transpose(3, 0, 1, 2)).astype(np.uint8)  # (N, H, W, C)
    return ArrayDataset(images, labels % 10, [str(d) for d in range(10)])  # label 10 is the digit 0


def locate_svhn(root: Path, split: str) -> Source:
    path = root / "svhn" / _SVHN_FILES[split]
    if not path.is_file():
        raise not_found("svhn", split, [path], f"Put {_SVHN_FILES[split]} from "
                         f"http://ufldl.stanford.edu/housenumbers/ into {root / 'svhn'}")
    return Source((path,), lambda: _decode_svhn(path))
