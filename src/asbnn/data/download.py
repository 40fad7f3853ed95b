"""Download the official CIFAR archives, refusing any file whose checksum does not match.

The archive is kept as downloaded: the readers take the pickles straight out of the .tar.gz.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from asbnn.data.registry import resolve_data_root
from asbnn.errors import ConfigError, DataError
from asbnn.fileio import atomic_file


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    filename: str  # name in the data root, where the readers look for it


ARCHIVES: Mapping[str, Archive] = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz"),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz"),
}


def download_dataset(name: str, root: str | os.PathLike | None,
                     *, archives: Mapping[str, Archive] = ARCHIVES) -> Path:
    """Fetch `name`'s archive into the data root (skipped when a verified copy is there); return its path."""
    if name not in archives:
        raise ConfigError(f"cannot download {name!r}: downloads exist for {', '.join(archives)} only")
    archive = archives[name]
    root = resolve_data_root(root)
    target = root / archive.filename
    if target.is_file() and _md5(target) == archive.md5:
        return target
    try:
        with atomic_file(target) as out:
            digest = _fetch(archive.url, out, root)
            if digest != archive.md5:
                raise DataError(f"checksum mismatch for {archive.url}: md5 {digest}, expected {archive.md5}; "
                                "the download was discarded")
    except OSError as err:
        raise DataError(f"cannot write to the data folder {root}: {err}") from err
    return target


def _fetch(url: str, out: BinaryIO, root: Path) -> str:
    """Stream `url` into `out` with a progress bar; return the md5 of what was written."""
    md5 = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, disable=None) as bar:
                while chunk := response.read(1 << 20):
                    md5.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError, http.client.HTTPException) as err:
        raise DataError(f"could not download {url} ({err}); download it by hand into {root}") from err
    return md5.hexdigest()


def _md5(path: Path) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    return md5.hexdigest()
