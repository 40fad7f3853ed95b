"""Fashion-MNIST and MNIST: the gzip (or plain) IDX files of their official releases."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from asbnn.data.dataset import ArrayDataset, Locator, Source, check_labels, not_found
from asbnn.data.reading import reading
from asbnn.errors import DataError

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(digit) for digit in range(10))

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes, checking magic number, dimensions and length."""
    with reading(path):
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    header = 4 + 4 * ndim
    magic = raw[:4]
    if len(raw) < header or magic != bytes((0, 0, 0x08, ndim)):
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
                        f"(magic number {magic.hex() or 'missing'}, expected 000008{ndim:02x})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected, found = math.prod(dims), len(raw) - header
    if found != expected:
        raise DataError(f"{path}: expected {expected} data bytes for shape {dims}, found {found} "
                        "(truncated or corrupt file)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _decode_idx(images_path: Path, labels_path: Path, classes: tuple[str, ...]) -> ArrayDataset:
    images = _read_idx(images_path, 3)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected 28x28 images, found {images.shape[2]}x{images.shape[1]}")
    labels = _read_idx(labels_path, 1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: has {len(labels)} labels but {images_path.name} has {len(images)} images")
    check_labels(labels, len(classes), str(labels_path))
    return ArrayDataset(images[..., None], labels, list(classes))


def idx_locator(name: str, folder: str, classes: tuple[str, ...], origin: str) -> Locator:
    def locate(root: Path, split: str) -> Source:
        found, looked = [], []
        for base in _IDX_FILES[split]:
            candidates = [root / folder / f"{base}.gz", root / folder / base]
            hit = next((p for p in candidates if p.is_file()), None)
            looked += candidates if hit is None else []
            found.append(hit)
        if looked:
            raise not_found(name, split, looked, f"Put the IDX files from {origin} into {root / folder}")
        images_path, labels_path = found
        return Source((images_path, labels_path), lambda: _decode_idx(images_path, labels_path, classes))

    return locate
