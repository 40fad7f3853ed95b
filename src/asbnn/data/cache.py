"""Decode once: keep decoded arrays as .npz files, keyed by the source files they came from.

Decoding 60,000 JPEGs takes seconds; loading the same arrays from an uncompressed .npz takes a
fraction of one. An entry is named after the data set, split and the sources' absolute paths,
and stores a stamp of the sources' sizes and mtimes, so a changed source is decoded again and
overwrites its own entry instead of piling up stale ones.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from asbnn.fileio import atomic_file

# Bump when a decoder changes what it produces, so every old entry is decoded again.
CACHE_VERSION = 1
_STAMP_KEY = "__stamp__"

Arrays = dict[str, np.ndarray]


def cache_dir() -> Path:
    """$ASBNN_CACHE, else ~/.cache/asbnn/arrays."""
    env = os.environ.get("ASBNN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "asbnn" / "arrays"


def cache_path(tag: str, sources: Sequence[Path]) -> Path:
    """The entry for `tag` (data set and split) decoded from `sources`."""
    where = "\0".join(str(Path(p).absolute()) for p in sources)
    digest = hashlib.sha256(where.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", tag)
    return cache_dir() / f"{slug}-{digest}.npz"


def stamp(sources: Sequence[Path]) -> str:
    """A digest of every source file's path, size and mtime; folders count as all files below them."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}\n".encode())
    for source in sources:
        for file in _files(Path(source)):
            info = file.stat()
            digest.update(f"{file.absolute()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached(tag: str, sources: Sequence[Path], decode: Callable[[], Arrays]) -> Arrays:
    """The cached arrays for `tag` if `sources` are unchanged since they were stored, else `decode()`'s."""
    path = cache_path(tag, sources)
    current = stamp(sources)  # taken before decoding: a source changed meanwhile is caught next time
    arrays = _load(path, current)
    if arrays is None:
        arrays = decode()
        _store(path, current, arrays)
    return arrays


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*") if p.is_file())
    else:
        yield path


def _load(path: Path, expected_stamp: str) -> Arrays | None:
    """The entry's arrays, or None when it is absent, stale or unreadable (then it is simply rebuilt)."""
    try:
        with path.open("rb") as file, np.load(file, allow_pickle=False) as npz:  # own the file: always closed
            if str(npz[_STAMP_KEY]) != expected_stamp:
                return None
            return {key: npz[key] for key in npz.files if key != _STAMP_KEY}
    except Exception:  # missing, truncated or corrupt in any way: a cache miss, never an error
        return None


def _store(path: Path, entry_stamp: str, arrays: Arrays) -> None:
    """Write atomically so a crash never leaves a half-written entry; a failure only costs time."""
    try:
        with atomic_file(path) as out:
            np.savez(out, **{_STAMP_KEY: np.array(entry_stamp)}, **arrays)
    except OSError as err:  # the cache only saves time: carry on without it
        warnings.warn(f"could not write the array cache {path} ({err}); the data will be decoded again next time",
                      stacklevel=3)
