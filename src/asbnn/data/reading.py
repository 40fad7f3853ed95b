"""Reading files for the data readers: every failure becomes one DataError line naming the file."""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from asbnn.errors import DataError, first_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_FORMATS = ("JPEG", "PNG")  # skip Pillow's probing of every other format


@contextmanager
def reading(path: Path | str) -> Iterator[None]:
    """Report I/O, gzip and tar failures inside the block as one DataError naming `path`."""
    try:
        yield
    except (OSError, EOFError, zlib.error, tarfile.TarError) as err:
        raise DataError(f"cannot read {path}: {first_line(err)}") from err


@contextmanager
def decoding(where: str) -> Iterator[None]:
    """Report Pillow failures inside the block as one DataError naming the image."""
    try:
        yield
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where} is not a readable image: {err}") from err


def read_bytes(path: Path) -> bytes:
    with reading(path):
        return path.read_bytes()


def utf8_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text: {err}") from err


def member_name(member: tarfile.TarInfo) -> str:
    return member.name.removeprefix("./")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
