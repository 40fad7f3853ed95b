"""Tiny ImageNet validation images, resized to 32x32 (an out-of-distribution set for CIFAR models)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from asbnn.data.dataset import ArrayDataset, Source, not_found
from asbnn.data.reading import IMAGE_FORMATS, decoding, member_name, read_bytes, reading, utf8_text
from asbnn.errors import ConfigError, DataError


_TINY = "tiny-imagenet-200-val"


def _decode_resized(data: bytes, where: str) -> np.ndarray:
    with decoding(where), Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
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
        return _decode_resized(read_bytes(path), str(path))

    wnids, annotations = (utf8_text(read_bytes(folder / n), str(folder / n)) for n in ("wnids.txt", "val_annotations.txt"))
    return _tiny_dataset(wnids, annotations, image, str(folder))


def _read_tiny_tar(archive: Path) -> ArrayDataset:
    texts: dict[str, str] = {}
    decoded: dict[str, np.ndarray] = {}
    with reading(archive), tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member_name(member)
            if not member.isfile() or not name.startswith(f"{_TINY}/"):
                continue
            rel, where = name[len(_TINY) + 1:], f"{archive}:{name}"
            if rel in ("wnids.txt", "val_annotations.txt"):
                texts[rel] = utf8_text(tar.extractfile(member).read(), where)
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


def locate_tiny(root: Path, split: str) -> Source:
    if split != "test":
        raise ConfigError("tiny-imagenet-val has only a 'test' split (it is an out-of-distribution set)")
    folder, archive = root / _TINY, root / f"{_TINY}.tar.gz"
    if folder.is_dir():
        return Source((folder,), lambda: _read_tiny_dir(folder))
    if archive.is_file():
        return Source((archive,), lambda: _read_tiny_tar(archive))
    raise not_found("tiny-imagenet-val", split, [folder, archive],
                     f"Copy tiny-imagenet-200/val/ and wnids.txt from http://cs231n.stanford.edu/tiny-imagenet-200.zip "
                     f"into {folder}")
