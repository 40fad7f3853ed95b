"""Atomic file writes and JSON-lines logs: a killed process never leaves a half-written file behind.

Files are written to a temporary name in the same folder, flushed to disk, then renamed over the
target (a rename is atomic on POSIX). A file being replaced can first be hard-linked (or, where
the file system has no links, copied) to `<name>.prev<suffix>`, so at every instant both names hold
a complete file. A failed write (full disk, read-only folder) is one CheckpointError line naming
the file, and the files already there stay as they were.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointError

TEMP_SUFFIX = ".tmp"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Report an OSError inside the block (no space, read-only folder) as one line naming `path`."""
    try:
        yield
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from err


def previous_path(path: str | Path) -> Path:
    """Where `atomic_write_bytes(keep_previous=True)` keeps the file it replaced: a.pt -> a.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A new file that replaces `path` once the block ends without error; on an error it vanishes.

    What the block wrote is on disk (fsynced) before the rename. OSErrors propagate as they are:
    each caller says in its own terms what a failed write means (an error, a warning).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the file from the rest of a group
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _rename(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, keep_previous: bool = False) -> None:
    """Replace `path` with `data` atomically; with `keep_previous`, the old file becomes `previous_path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_previous and path.exists():
            _rename(_temp_link(path), previous_path(path))
        with atomic_file(path) as f:
            f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def restore_from(source: str | Path, path: str | Path) -> None:
    """Atomically replace `path` with a copy of `source` (a good file over a damaged one);
    a copy, so that damage to one of the two files later cannot reach the other."""
    atomic_write_bytes(path, Path(source).read_bytes())


def remove_stale_temps(folder: str | Path, *names: str) -> None:
    """Delete the temporary files a killed writer left beside `names` in `folder`; nothing reads them."""
    folder = Path(folder)
    with writing(folder):
        for name in names:
            for tmp in folder.glob(f".{glob.escape(name)}.*{TEMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)


def _rename(tmp: Path, target: Path) -> None:
    """Rename `tmp` over `target` atomically; if that fails, `target` is untouched.

    `tmp` is gone afterwards in every case: a rename between two links of one file (a save after a
    failed one, whose rotation already linked the file to its previous name) does nothing.
    """
    try:
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_link(source: Path) -> Path:
    """A temporary second name for `source` beside it, to rename over another file; a copy where
    the file system has no hard links."""
    tmp = source.with_name(f".{source.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        os.link(source, tmp)
    except OSError:
        if not source.is_file():
            raise
        with atomic_file(tmp) as f:
            f.write(source.read_bytes())
    return tmp


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` survive a power cut. Some file systems cannot fsync a folder;
    there the rename is as durable as that file system makes it, which is all one can ask."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it, so the log survives a kill right after it is written."""
    with writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines log up to the first line that is not a JSON object (a line cut short by a
    kill or a full disk); later lines cannot be trusted to follow on from it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(record, dict):
            break
        records.append(record)
    return records
