"""Shared fixtures: the real offline data sets beside the repo, and decoded-array caches for tests."""

import os
from pathlib import Path

import pytest

from asbnn.data import cache

SHARED_DATA = Path(os.environ.get("ASBNN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
#: Decoded arrays of the shared data sets: outside the repo, apart from the user's own cache and kept
#: between test runs, so the 70,000 JPEGs of cifar10-jpeg are decoded once per machine, not once per
#: run. Entries are keyed by their source files (path, size, mtime), so a changed data set is decoded again.
TEST_CACHE = Path(os.environ.get("ASBNN_TEST_CACHE", Path.home() / ".cache" / "asbnn-test" / "arrays"))


def _under_shared_data(sources) -> bool:
    shared = SHARED_DATA.resolve()
    return all(Path(s).resolve().is_relative_to(shared) for s in sources)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.fail(f"the shared data sets are missing: expected them in {SHARED_DATA} (set ASBNN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def array_cache(tmp_path_factory):
    """ASBNN_CACHE is the kept test cache; data sets a test builds in its own folder are cached in a
    folder of this session instead, so they never pile up in the kept one."""
    session_cache = tmp_path_factory.mktemp("asbnn-cache")
    real_cached = cache.cached

    def routed(tag, sources, decode):
        if os.environ.get("ASBNN_CACHE") != str(TEST_CACHE) or _under_shared_data(sources):
            return real_cached(tag, sources, decode)  # shared data, or a test that set its own cache
        os.environ["ASBNN_CACHE"] = str(session_cache)
        try:
            return real_cached(tag, sources, decode)
        finally:
            os.environ["ASBNN_CACHE"] = str(TEST_CACHE)

    old = os.environ.get("ASBNN_CACHE")
    os.environ["ASBNN_CACHE"] = str(TEST_CACHE)
    cache.cached = routed
    yield TEST_CACHE
    cache.cached = real_cached
    if old is None:
        os.environ.pop("ASBNN_CACHE", None)
    else:
        os.environ["ASBNN_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory):
    """Measured precision decisions (amp: auto) of this session only, never the user's own cache; set
    in the environment so that child processes share it."""
    old = os.environ.get("ASBNN_PRECISION_CACHE")
    os.environ["ASBNN_PRECISION_CACHE"] = str(tmp_path_factory.mktemp("precision") / "precision.json")
    yield
    if old is None:
        os.environ.pop("ASBNN_PRECISION_CACHE", None)
    else:
        os.environ["ASBNN_PRECISION_CACHE"] = old
