"""CIFAR-10 and CIFAR-100 in the official python release: pickled batches, as a folder or the .tar.gz."""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asbnn.data.dataset import ArrayDataset, Locator, Source, check_labels, not_found
from asbnn.data.folders import CIFAR10_JPEG, locate_folder
from asbnn.data.reading import member_name, read_bytes, reading
from asbnn.errors import DataError

# The paper normalises CIFAR with the ImageNet statistics.
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _CifarLayout:
    """Where the official python release keeps each split, and under which keys."""

    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int

    def files(self, split: str) -> tuple[str, ...]:
        return self.train_files if split == "train" else self.test_files


CIFAR10_LAYOUT = _CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                        "batches.meta", b"labels", b"label_names", 10)
CIFAR100_LAYOUT = _CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",),
                         "meta", b"fine_labels", b"fine_label_names", 100)

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists and numpy arrays only: the archives come from the network, and a
    plain unpickler would run any code a tampered file names."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # whatever went wrong, the file is not a CIFAR pickle
        raise DataError(f"{where} is not a valid CIFAR pickle: {err}") from err
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _cifar_batch(batch: dict, layout: _CifarLayout, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The validated (N, 3072) pixel rows and int64 labels of one batch."""
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: expected b'data' as a uint8 array of shape (N, 3072), found {found}")
    try:
        labels = np.asarray(batch.get(layout.label_key))
    except (ValueError, TypeError):
        labels = np.asarray(None)
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: expected {len(data)} integer labels under {layout.label_key!r}")
    check_labels(labels, layout.num_classes, where)
    return data, labels.astype(np.int64)


def _cifar_names(meta: dict, layout: _CifarLayout, where: str) -> list[str]:
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes \
            or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{where}: expected {layout.num_classes} class names under {layout.names_key!r}")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _decode_cifar(layout: _CifarLayout, split: str, blobs: dict[str, bytes], origin: str) -> ArrayDataset:
    meta_where = f"{origin}/{layout.meta_file}"
    classes = _cifar_names(_unpickle(blobs[layout.meta_file], meta_where), layout, meta_where)
    batches = [_cifar_batch(_unpickle(blobs[f], f"{origin}/{f}"), layout, f"{origin}/{f}")
               for f in layout.files(split)]
    rows = np.concatenate([rows for rows, _ in batches])
    # Each row holds the R, G and B planes one after another, each 32x32 row-major.
    images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return ArrayDataset(images, np.concatenate([labels for _, labels in batches]), classes)


def _tar_members(archive: Path, top: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """The named files under `top/` of a tar archive, read in one pass without extracting to disk."""
    wanted = {f"{top}/{name}": name for name in names}
    blobs = {}
    with reading(archive), tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = wanted.get(member_name(member))
            if name is not None and member.isfile():
                blobs[name] = tar.extractfile(member).read()
    missing = [f"{top}/{n}" for n in names if n not in blobs]
    if missing:
        raise DataError(f"{archive} has no member {missing[0]}; is it the official CIFAR archive?")
    return blobs


def cifar_locator(name: str, layout: _CifarLayout, jpeg_fallback: bool) -> Locator:
    def locate(root: Path, split: str) -> Source:
        files = (*layout.files(split), layout.meta_file)
        folder, archive = root / layout.folder, root / layout.archive
        if folder.is_dir():
            paths = tuple(folder / f for f in files)
            for path in paths:
                if not path.is_file():
                    raise DataError(f"{path} is missing from the CIFAR folder {folder}")
            return Source(paths, lambda: _decode_cifar(
                layout, split, {p.name: read_bytes(p) for p in paths}, str(folder)))
        if archive.is_file():
            return Source((archive,), lambda: _decode_cifar(
                layout, split, _tar_members(archive, layout.folder, files), f"{archive}:{layout.folder}"))
        looked = [folder, archive]
        if jpeg_fallback:
            jpeg_folder, jpeg_archive = root / "cifar10-jpeg", root / "cifar10-jpeg.tar.gz"
            if jpeg_folder.is_dir() or jpeg_archive.is_file():
                return locate_folder(jpeg_folder if jpeg_folder.is_dir() else jpeg_archive, split, CIFAR10_JPEG)
            looked += [jpeg_folder, jpeg_archive]
        raise not_found(name, split, looked, f"Get it with `asbnn download {name} --data-root {root}`")

    return locate
