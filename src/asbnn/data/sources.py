"""The data set registry, and readers that turn each supported on-disk format into uint8 NHWC arrays.

Every reader validates what it reads and reports a problem as one DataError line naming the
file, so a corrupt or misplaced download never surfaces as a traceback from numpy or Pillow.
"""

from __future__ import annotations

import codecs
import gzip
import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from asbnn.data import cache
from asbnn.data.matlab import read_mat
from asbnn.errors import ConfigError, DataError

SPLITS = ("train", "test")
# The paper normalises CIFAR with the ImageNet statistics.
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(digit) for digit in range(10))

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_IMAGE_FORMATS = ("JPEG", "PNG")  # skip Pillow's probing of every other format
_GRAY_MODES = ("1", "L", "LA")


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


@dataclass
class ArrayDataset:
    """A whole split in memory: uint8 images (N, H, W, C), int64 labels (N,), class names by label."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


# --------------------------------------------------------------------------------------------
# Public entry points


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def dataset_info(name: str) -> DatasetInfo:
    """A registered set's fixed description, or one inferred from an image folder (decoding it once)."""
    if name in _REGISTRY:
        return _REGISTRY[name].info
    try:
        data = load_dataset(name, "train")
    except _SplitMissing:
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
        source, tag = _locate_folder(path, split, _FolderSpec()), f"folder-{path.name}-{split}"
    arrays = cache.cached(tag, source.paths, lambda: _to_arrays(source.decode()))
    return ArrayDataset(arrays["images"], arrays["labels"], arrays["classes"].tolist())


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Source:
    """A located split: the paths its cache entry depends on, and how to decode it."""

    paths: tuple[Path, ...]
    decode: Callable[[], ArrayDataset]


_Locator = Callable[[Path, str], _Source]  # (data root, split) -> source; DataError when absent


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    locate: _Locator


class _SplitMissing(DataError):
    """An image folder lacks the requested split (dataset_info then falls back to the other)."""


def _not_found(name: str, split: str, looked: list[Path], how: str) -> DataError:
    paths = ", ".join(str(p) for p in looked)
    return DataError(f"{name} ({split}) not found; looked for {paths}. {how}, "
                     "or pass --data-root / set ASBNN_DATA to the folder that holds it")


def _folder_path(name: str) -> Path:
    """`name` as an image-folder path; a name that does not look like a path is an unknown data set."""
    path = Path(name).expanduser()
    looks_like_path = "/" in name or os.sep in name or name.startswith("~") or name.endswith(_ARCHIVE_SUFFIXES)
    if not looks_like_path and not path.exists():
        raise ConfigError(f"unknown data set {name!r}; valid names: {', '.join(list_datasets())}, "
                          "or the path of an image folder or .tar.gz of one")
    if not path.exists():
        raise DataError(f"image folder {path} does not exist (expected <split>/<class>/*.jpg|png inside)")
    return path.absolute()


def _to_arrays(data: ArrayDataset) -> cache.Arrays:
    return {"images": data.images, "labels": data.labels, "classes": np.array(data.classes, dtype=str)}


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"{where}: label {bad[0]} is out of range for {num_classes} classes")


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


# --------------------------------------------------------------------------------------------
# Low-level reading helpers


@contextmanager
def _reading(path: Path | str) -> Iterator[None]:
    """Report I/O, gzip and tar failures inside the block as one DataError naming `path`."""
    try:
        yield
    except (OSError, EOFError, zlib.error, tarfile.TarError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read {path}: {first_line}") from err


@contextmanager
def _decoding(where: str) -> Iterator[None]:
    """Report Pillow failures inside the block as one DataError naming the image."""
    try:
        yield
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where} is not a readable image: {err}") from err


def _read_bytes(path: Path) -> bytes:
    with _reading(path):
        return path.read_bytes()


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text: {err}") from err


def _member_name(member: tarfile.TarInfo) -> str:
    return member.name.removeprefix("./")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES) and not name.startswith(".")


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, official python-format release


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


_CIFAR10 = _CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                        "batches.meta", b"labels", b"label_names", 10)
_CIFAR100 = _CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",),
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
    _check_labels(labels, layout.num_classes, where)
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
    with _reading(archive), tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = wanted.get(_member_name(member))
            if name is not None and member.isfile():
                blobs[name] = tar.extractfile(member).read()
    missing = [f"{top}/{n}" for n in names if n not in blobs]
    if missing:
        raise DataError(f"{archive} has no member {missing[0]}; is it the official CIFAR archive?")
    return blobs


def _cifar_locator(name: str, layout: _CifarLayout, jpeg_fallback: bool) -> _Locator:
    def locate(root: Path, split: str) -> _Source:
        files = (*layout.files(split), layout.meta_file)
        folder, archive = root / layout.folder, root / layout.archive
        if folder.is_dir():
            paths = tuple(folder / f for f in files)
            for path in paths:
                if not path.is_file():
                    raise DataError(f"{path} is missing from the CIFAR folder {folder}")
            return _Source(paths, lambda: _decode_cifar(
                layout, split, {p.name: _read_bytes(p) for p in paths}, str(folder)))
        if archive.is_file():
            return _Source((archive,), lambda: _decode_cifar(
                layout, split, _tar_members(archive, layout.folder, files), f"{archive}:{layout.folder}"))
        looked = [folder, archive]
        if jpeg_fallback:
            jpeg_folder, jpeg_archive = root / "cifar10-jpeg", root / "cifar10-jpeg.tar.gz"
            if jpeg_folder.is_dir() or jpeg_archive.is_file():
                return _locate_folder(jpeg_folder if jpeg_folder.is_dir() else jpeg_archive, split, _CIFAR10_JPEG)
            looked += [jpeg_folder, jpeg_archive]
        raise _not_found(name, split, looked, f"Get it with `asbnn download {name} --data-root {root}`")

    return locate


# --------------------------------------------------------------------------------------------
# Fashion-MNIST / MNIST, gzip IDX files

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes, checking magic number, dimensions and length."""
    with _reading(path):
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
    _check_labels(labels, len(classes), str(labels_path))
    return ArrayDataset(images[..., None], labels, list(classes))


def _idx_locator(name: str, folder: str, classes: tuple[str, ...], origin: str) -> _Locator:
    def locate(root: Path, split: str) -> _Source:
        found, looked = [], []
        for base in _IDX_FILES[split]:
            candidates = [root / folder / f"{base}.gz", root / folder / base]
            hit = next((p for p in candidates if p.is_file()), None)
            looked += candidates if hit is None else []
            found.append(hit)
        if looked:
            raise _not_found(name, split, looked, f"Put the IDX files from {origin} into {root / folder}")
        images_path, labels_path = found
        return _Source((images_path, labels_path), lambda: _decode_idx(images_path, labels_path, classes))

    return locate


# --------------------------------------------------------------------------------------------
# Image folders: <top>/<split>/<class>/*.jpg|png, as a folder or a tar archive


@dataclass(frozen=True)
class _FolderSpec:
    """What a folder's images must be; None means whatever the first image is (the rest must match)."""

    mode: str | None = None
    size: tuple[int, int] | None = None
    classes: tuple[str, ...] | None = None


_CIFAR10_JPEG = _FolderSpec(mode="RGB", size=(32, 32), classes=CIFAR10_CLASSES)

_Item = tuple[str, str, bytes]  # (class, where, encoded image)


def _split_dir(path: Path, split: str) -> Path:
    """`path/split`, or `path/<top>/split` when the folder wraps everything in one top folder."""
    if (path / split).is_dir():
        return path / split
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / split).is_dir():
        return subdirs[0] / split
    raise _SplitMissing(f"{path} has no {split} split (expected {path}/{split}/<class>/<image> "
                        f"or {path}/<top>/{split}/<class>/<image>)")


def _dir_items(split_dir: Path) -> tuple[list[str], list[_Item]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    items = []
    for name in classes:
        files = sorted(f for f in (split_dir / name).iterdir() if _is_image_name(f.name) and f.is_file())
        if not files:
            raise DataError(f"class folder {split_dir / name} has no .jpg/.jpeg/.png images")
        items += [(name, str(f), _read_bytes(f)) for f in files]
    return classes, items


def _tar_items(archive: Path, split: str) -> tuple[list[str], list[_Item]]:
    """Class names and images of one split, read from the archive in a single pass."""
    counts: dict[str, int] = {}
    folders: dict[str, str] = {}  # class -> its directory member, to name an empty one
    items = []
    depth = None  # parts before the split folder: 0 for <split>/..., 1 for <top>/<split>/...
    with _reading(archive), tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = PurePosixPath(_member_name(member)).parts
            if not parts:
                continue
            if depth is None:
                depth = 0 if parts[0] in SPLITS else 1
            if len(parts) <= depth or parts[depth] != split:
                continue
            rel = parts[depth + 1:]
            if not rel or rel[0].startswith("."):
                continue
            if member.isdir() and len(rel) == 1:
                counts.setdefault(rel[0], 0)
                folders[rel[0]] = member.name
            elif member.isfile() and len(rel) == 2 and _is_image_name(rel[1]):
                counts[rel[0]] = counts.get(rel[0], 0) + 1
                items.append((rel[0], f"{archive}:{member.name}", tar.extractfile(member).read()))
    if not counts:
        raise _SplitMissing(f"{archive} has no {split} split (expected members {split}/<class>/<image> "
                            f"or <top>/{split}/<class>/<image>)")
    empty = sorted(name for name, count in counts.items() if count == 0)
    if empty:
        raise DataError(f"class folder {archive}:{folders[empty[0]]} has no .jpg/.jpeg/.png images")
    return sorted(counts), items


def _decode_images(items: list[_Item], spec: _FolderSpec) -> np.ndarray:
    """Decode into one (N, H, W, C) array; every image must match the spec or, failing that, the first."""
    out = None  # allocated once the first image fixes the shape
    for i, (_, where, data) in enumerate(items):
        with _decoding(where), Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS) as image:
            mode = spec.mode or ("L" if image.mode in _GRAY_MODES else "RGB")
            if out is None:
                first, want_mode, (width, height) = where, mode, spec.size or image.size
                out = np.empty((len(items), height, width, len(want_mode)), np.uint8)
                reason = "required for this data set" if spec.size else f"like {first}"
            if mode != want_mode:
                raise DataError(f"{where} has {len(mode)} channel(s), expected {len(want_mode)} like {first}")
            if image.size != (width, height):
                raise DataError(f"{where} is {image.size[0]}x{image.size[1]}, expected {width}x{height} ({reason})")
            if image.mode != mode:
                image = image.convert(mode)
            out[i] = np.asarray(image).reshape(out.shape[1:])
    return out


def _read_image_folder(path: Path, split: str, spec: _FolderSpec) -> ArrayDataset:
    if path.is_file():
        classes, items = _tar_items(path, split)
    else:
        with _reading(path):  # unlistable folders
            classes, items = _dir_items(_split_dir(path, split))
    if spec.classes is not None and tuple(classes) != spec.classes:
        raise DataError(f"{path}: expected the class folders {', '.join(spec.classes)}; "
                        f"found {', '.join(classes)}")
    items.sort(key=lambda item: (item[0], item[1]))
    index = {name: label for label, name in enumerate(classes)}
    labels = np.array([index[name] for name, _, _ in items], dtype=np.int64)
    return ArrayDataset(_decode_images(items, spec), labels, classes)


def _locate_folder(path: Path, split: str, spec: _FolderSpec) -> _Source:
    # A folder's cache entry depends on every file of its split; an archive's on the archive alone.
    with _reading(path):
        paths = (path,) if path.is_file() else (_split_dir(path, split),)
    return _Source(paths, lambda: _read_image_folder(path, split, spec))


# --------------------------------------------------------------------------------------------
# Tiny ImageNet validation images, resized to 32x32 (out-of-distribution set for CIFAR)

_TINY = "tiny-imagenet-200-val"


def _decode_resized(data: bytes, where: str) -> np.ndarray:
    with _decoding(where), Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS) as image:
        return np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))


def _tiny_dataset(wnids: str, annotations: str, image: Callable[[str], np.ndarray], origin: str) -> ArrayDataset:
    """Images in val_annotations.txt order, labelled by their wnid's line in wnids.txt."""
    classes = wnids.split()
    if len(classes) != 200 or len(set(classes)) != 200:
        raise DataError(f"{origin}/wnids.txt: expected 200 distinct wnids, found {len(set(classes))}")
    index = {wnid: label for label, wnid in enumerate(classes)}
    images, labels = [], []
    for line_no, line in enumerate(annotations.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{origin}/val_annotations.txt line {line_no}: expected "
                            "'<file>\\t<wnid from wnids.txt>\\t...'")
        images.append(image(fields[0]))
        labels.append(index[fields[1]])
    if not images:
        raise DataError(f"{origin}/val_annotations.txt lists no images")
    return ArrayDataset(np.stack(images), np.array(labels, dtype=np.int64), classes)


def _read_tiny_dir(folder: Path) -> ArrayDataset:
    def image(name: str) -> np.ndarray:
        path = folder / "images" / name
        return _decode_resized(_read_bytes(path), str(path))

    wnids, annotations = (_text(_read_bytes(folder / n), str(folder / n)) for n in ("wnids.txt", "val_annotations.txt"))
    return _tiny_dataset(wnids, annotations, image, str(folder))


def _read_tiny_tar(archive: Path) -> ArrayDataset:
    texts: dict[str, str] = {}
    decoded: dict[str, np.ndarray] = {}
    with _reading(archive), tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = _member_name(member)
            if not member.isfile() or not name.startswith(f"{_TINY}/"):
                continue
            rel, where = name[len(_TINY) + 1:], f"{archive}:{name}"
            if rel in ("wnids.txt", "val_annotations.txt"):
                texts[rel] = _text(tar.extractfile(member).read(), where)
            elif rel.startswith("images/"):
                decoded[rel.removeprefix("images/")] = _decode_resized(tar.extractfile(member).read(), where)
    for rel in ("wnids.txt", "val_annotations.txt"):
        if rel not in texts:
            raise DataError(f"{archive} has no member {_TINY}/{rel}")

    def image(name: str) -> np.ndarray:
        if name not in decoded:
            raise DataError(f"{archive} has no member {_TINY}/images/{name} (listed in val_annotations.txt)")
        return decoded[name]

    return _tiny_dataset(texts["wnids.txt"], texts["val_annotations.txt"], image, f"{archive}:{_TINY}")


def _locate_tiny(root: Path, split: str) -> _Source:
    if split != "test":
        raise ConfigError("tiny-imagenet-val has only a 'test' split (it is an out-of-distribution set)")
    folder, archive = root / _TINY, root / f"{_TINY}.tar.gz"
    if folder.is_dir():
        return _Source((folder,), lambda: _read_tiny_dir(folder))
    if archive.is_file():
        return _Source((archive,), lambda: _read_tiny_tar(archive))
    raise _not_found("tiny-imagenet-val", split, [folder, archive],
                     f"Copy tiny-imagenet-200/val/ and wnids.txt from http://cs231n.stanford.edu/tiny-imagenet-200.zip "
                     f"into {folder}")


# --------------------------------------------------------------------------------------------
# SVHN: the official {train,test}_32x32.mat files (MATLAB 5)

_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _decode_svhn(path: Path) -> ArrayDataset:
    with _reading(path):
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


def _locate_svhn(root: Path, split: str) -> _Source:
    path = root / "svhn" / _SVHN_FILES[split]
    if not path.is_file():
        raise _not_found("svhn", split, [path], f"Put {_SVHN_FILES[split]} from "
                         f"http://ufldl.stanford.edu/housenumbers/ into {root / 'svhn'}")
    return _Source((path,), lambda: _decode_svhn(path))


_REGISTRY: dict[str, _Entry] = {
    "cifar10": _Entry(DatasetInfo("cifar10", 10, 3, 32, CIFAR_MEAN, CIFAR_STD, augment=True),
                      _cifar_locator("cifar10", _CIFAR10, jpeg_fallback=True)),
    "cifar100": _Entry(DatasetInfo("cifar100", 100, 3, 32, CIFAR_MEAN, CIFAR_STD, augment=True),
                       _cifar_locator("cifar100", _CIFAR100, jpeg_fallback=False)),
    "fashion-mnist": _Entry(DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), augment=False),
                            _idx_locator("fashion-mnist", "fashion-mnist", FASHION_MNIST_CLASSES,
                                         "https://github.com/zalandoresearch/fashion-mnist")),
    "mnist": _Entry(DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), augment=False),
                    _idx_locator("mnist", "mnist", MNIST_CLASSES, "http://yann.lecun.com/exdb/mnist/")),
    # street-view digits: no flips (they would mirror digits); the usual OOD set for CIFAR models
    "svhn": _Entry(DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                               augment=False), _locate_svhn),
    # 32x32 natural images like CIFAR's; only ever evaluated, as out-of-distribution data.
    "tiny-imagenet-val": _Entry(DatasetInfo("tiny-imagenet-val", 200, 3, 32, CIFAR_MEAN, CIFAR_STD, augment=True),
                                _locate_tiny),
}
