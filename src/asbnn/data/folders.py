"""Image folders: <top>/<split>/<class>/*.jpg|png, as a folder or a tar archive of one."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from asbnn.data.dataset import SPLITS, ArrayDataset, Source, SplitMissing
from asbnn.data.reading import IMAGE_FORMATS, decoding, is_image_name, member_name, read_bytes, reading
from asbnn.errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GRAY_MODES = ("1", "L", "LA")


@dataclass(frozen=True)
class FolderSpec:
    """What a folder's images must be; None means whatever the first image is (the rest must match)."""

    mode: str | None = None
    size: tuple[int, int] | None = None
    classes: tuple[str, ...] | None = None


CIFAR10_JPEG = FolderSpec(mode="RGB", size=(32, 32), classes=CIFAR10_CLASSES)

_Item = tuple[str, str, bytes]  # (class, where, encoded image)


def _split_dir(path: Path, split: str) -> Path:
    """`path/split`, or `path/<top>/split` when the folder wraps everything in one top folder."""
    if (path / split).is_dir():
        return path / split
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / split).is_dir():
        return subdirs[0] / split
    raise SplitMissing(f"{path} has no {split} split (expected {path}/{split}/<class>/<image> "
                        f"or {path}/<top>/{split}/<class>/<image>)")


def _dir_items(split_dir: Path) -> tuple[list[str], list[_Item]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    items = []
    for name in classes:
        files = sorted(f for f in (split_dir / name).iterdir() if is_image_name(f.name) and f.is_file())
        if not files:
            raise DataError(f"class folder {split_dir / name} has no .jpg/.jpeg/.png images")
        items += [(name, str(f), read_bytes(f)) for f in files]
    return classes, items


def _tar_items(archive: Path, split: str) -> tuple[list[str], list[_Item]]:
    """Class names and images of one split, read from the archive in a single pass."""
    counts: dict[str, int] = {}
    folders: dict[str, str] = {}  # class -> its directory member, to name an empty one
    items = []
    depth = None  # parts before the split folder: 0 for <split>/..., 1 for <top>/<split>/...
    with reading(archive), tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = PurePosixPath(member_name(member)).parts
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
            elif member.isfile() and len(rel) == 2 and is_image_name(rel[1]):
                counts[rel[0]] = counts.get(rel[0], 0) + 1
                items.append((rel[0], f"{archive}:{member.name}", tar.extractfile(member).read()))
    if not counts:
        raise SplitMissing(f"{archive} has no {split} split (expected members {split}/<class>/<image> "
                            f"or <top>/{split}/<class>/<image>)")
    empty = sorted(name for name, count in counts.items() if count == 0)
    if empty:
        raise DataError(f"class folder {archive}:{folders[empty[0]]} has no .jpg/.jpeg/.png images")
    return sorted(counts), items


def _decode_images(items: list[_Item], spec: FolderSpec) -> np.ndarray:
    """Decode into one (N, H, W, C) array; every image must match the spec or, failing that, the first."""
    out = None  # allocated once the first image fixes the shape
    for i, (_, where, data) in enumerate(items):
        with decoding(where), Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            mode = spec.mode or ("L" if image.mode in GRAY_MODES else "RGB")
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


def _read_image_folder(path: Path, split: str, spec: FolderSpec) -> ArrayDataset:
    if path.is_file():
        classes, items = _tar_items(path, split)
    else:
        with reading(path):  # unlistable folders
            classes, items = _dir_items(_split_dir(path, split))
    if spec.classes is not None and tuple(classes) != spec.classes:
        raise DataError(f"{path}: expected the class folders {', '.join(spec.classes)}; "
                        f"found {', '.join(classes)}")
    items.sort(key=lambda item: (item[0], item[1]))
    index = {name: label for label, name in enumerate(classes)}
    labels = np.array([index[name] for name, _, _ in items], dtype=np.int64)
    return ArrayDataset(_decode_images(items, spec), labels, classes)


def locate_folder(path: Path, split: str, spec: FolderSpec) -> Source:
    # A folder's cache entry depends on every file of its split; an archive's on the archive alone.
    with reading(path):
        paths = (path,) if path.is_file() else (_split_dir(path, split),)
    return Source(paths, lambda: _read_image_folder(path, split, spec))
