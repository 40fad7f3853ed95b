"""Shared fixtures: the real offline data sets beside the repo, and a decoded-array cache for tests."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("ASBNN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
#: Outside the repo and apart from the user's own cache; kept between test runs, so the 70,000 JPEGs of
#: cifar10-jpeg are decoded once per machine, not once per run. Entries are keyed by their source files
#: (path, size, mtime: `asbnn.data.cache`), so a changed data set is decoded again.
TEST_CACHE = Path(os.environ.get("ASBNN_TEST_CACHE", Path.home() / ".cache" / "asbnn-test" / "arrays"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.fail(f"the shared data sets are missing: expected them in {SHARED_DATA} (set ASBNN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def array_cache():
    """Decoded arrays go to the test cache, never the user's."""
    old = os.environ.get("ASBNN_CACHE")
    os.environ["ASBNN_CACHE"] = str(TEST_CACHE)
    yield TEST_CACHE
    if old is None:
        os.environ.pop("ASBNN_CACHE", None)
    else:
        os.environ["ASBNN_CACHE"] = old
