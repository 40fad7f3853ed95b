"""Shared fixtures: the real offline data sets beside the repo, and a private array cache."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("ASBNN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.fail(f"the shared data sets are missing: expected them in {SHARED_DATA} (set ASBNN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Decoded arrays go to a cache private to this test session, never the user's."""
    cache = tmp_path_factory.mktemp("asbnn-cache")
    old = os.environ.get("ASBNN_CACHE")
    os.environ["ASBNN_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("ASBNN_CACHE", None)
    else:
        os.environ["ASBNN_CACHE"] = old
