"""Atomic writes and safe loads: a killed run never leaves a half-written file behind.

Files are written to a temporary name in the same folder, flushed to disk, then renamed over the
target (a rename is atomic on POSIX). A checkpoint being replaced is first hard-linked (or, where
the file system has no links, copied) to `<name>.prev.pt`, so at every instant both names hold a
complete file and a checkpoint damaged later (a bad disk, a copy cut short) still leaves a good one
to resume from. Checkpoints load with
`weights_only=True`, so a crafted pickle cannot execute code. A failed write (full disk, read-only
folder) is one CheckpointError line naming the file, and the files already there stay as they were.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import re
import secrets
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

TEMP_SUFFIX = ".tmp"


class DamagedCheckpoint(CheckpointError):
    """The file is truncated, corrupt or no checkpoint at all; an older good one may stand in for it.

    A file that would run code is not damaged but unsafe: that stays a plain CheckpointError.
    """


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Report an OSError inside the block (no space, read-only folder) as one line naming `path`."""
    try:
        yield
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from err


def previous_path(path: str | Path) -> Path:
    """Where `save_checkpoint` keeps the checkpoint it replaced: checkpoint.pt -> checkpoint.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_write_bytes(path: str | Path, data: bytes, *, keep_previous: bool = False) -> None:
    """Replace `path` with `data` atomically; with `keep_previous`, the old file becomes `previous_path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_previous and path.exists():
            _rename(_temp_link(path), previous_path(path))
        _rename(_temp_file(path, data), path)
        _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def restore_from(source: str | Path, path: str | Path) -> None:
    """Atomically replace `path` with a copy of `source` (a good checkpoint over a damaged one);
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
    failed one, whose rotation already linked the checkpoint to its previous name) does nothing.
    """
    try:
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_file(path: Path, data: bytes) -> Path:
    """`data` in a new temporary file beside `path`, on disk (fsynced) before it is renamed anywhere."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide run files from the rest of a group
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _temp_link(source: Path) -> Path:
    """A temporary second name for `source` beside it, to rename over another file; a copy where
    the file system has no hard links."""
    tmp = source.with_name(f".{source.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        os.link(source, tmp)
    except OSError:
        if not source.is_file():
            raise
        return _temp_file(source, source.read_bytes())
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


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` atomically, keeping the checkpoint it replaces as `previous_path(path)`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue(), keep_previous=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, refusing anything that is not plain data.

    Raises DamagedCheckpoint for a truncated, corrupt or foreign file, and a plain CheckpointError
    for a missing or unreadable one, or one whose pickle names code to run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols; the error says enough
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
        if blocked:
            raise CheckpointError(f"refusing to load {path}: its pickle would import {blocked[1]}, and a "
                                  "checkpoint written by asbnn holds only tensors and plain data") from None
        raise DamagedCheckpoint(f"checkpoint {path} is corrupt or not a checkpoint (unreadable pickle)") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # torch reports a damaged archive in many ways (RuntimeError, EOFError, ...)
        raise DamagedCheckpoint(f"checkpoint {path} is truncated or corrupt ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint's dict")
    return state


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it, so the log survives a kill right after an epoch."""
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
