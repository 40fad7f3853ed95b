"""Data readers, cache, download and DeviceLoader, on the real offline copies and on tiny archives
built here in the official layouts (the official CIFAR pickles are not available offline).

Uses conftest's `shared_data` (the real data sets) and its test cache (ASBNN_CACHE).
"""

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asbnn.data import (
    ArrayDataset,
    DeviceLoader,
    dataset_info,
    download_dataset,
    list_datasets,
    load_dataset,
    resolve_data_root,
)
from asbnn.data import cache
from asbnn.data.registry import _REGISTRY
from asbnn.data.download import ARCHIVES, Archive
from asbnn.errors import ConfigError, DataError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# Registry, roots, error messages


def test_registry_names_and_unknown_name():
    assert list_datasets() == ["cifar10", "cifar100", "fashion-mnist", "mnist", "svhn", "tiny-imagenet-val"]
    with pytest.raises(ConfigError) as err:
        dataset_info("cifar-11")
    assert all(name in one_line(err) for name in list_datasets())
    with pytest.raises(ConfigError):
        load_dataset("cifar-11", "train")


def test_bad_split(shared_data):
    with pytest.raises(ConfigError, match="split"):
        load_dataset("mnist", "validation", shared_data)
    with pytest.raises(ConfigError, match="only a 'test' split"):
        load_dataset("tiny-imagenet-val", "train", shared_data)


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("ASBNN_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("ASBNN_DATA")
    assert resolve_data_root(None) == Path.home() / ".cache" / "asbnn" / "data"


def test_env_root_is_used(shared_data, monkeypatch):
    monkeypatch.setenv("ASBNN_DATA", str(shared_data))
    assert load_dataset("mnist", "test").images.shape == (10000, 28, 28, 1)


@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["cifar-10-batches-py", "cifar-10-python.tar.gz", "cifar10-jpeg", "cifar10-jpeg.tar.gz",
                 "asbnn download cifar10"]),
    ("cifar100", ["cifar-100-python", "cifar-100-python.tar.gz", "asbnn download cifar100"]),
    ("fashion-mnist", ["fashion-mnist/t10k-images-idx3-ubyte.gz", "fashion-mnist/t10k-labels-idx1-ubyte"]),
    ("tiny-imagenet-val", ["tiny-imagenet-200-val", "tiny-imagenet-200-val.tar.gz"]),
])
def test_missing_dataset_lists_paths_looked_at(tmp_path, name, expected):
    with pytest.raises(DataError) as err:
        load_dataset(name, "test", tmp_path)
    message = one_line(err)
    for part in expected:
        assert part in message
    assert str(tmp_path) in message and "ASBNN_DATA" in message


# ----------------------------------------------------------------------------------------------
# Real data: IDX, CIFAR-10 JPEG tar, Tiny ImageNet


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_real(shared_data, name):
    train, test = load_dataset(name, "train", shared_data), load_dataset(name, "test", shared_data)
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    for data in (train, test):
        assert data.images.dtype == np.uint8 and data.labels.dtype == np.int64
        assert set(np.unique(data.labels)) == set(range(10)) and len(data.classes) == 10
    if name == "mnist":
        assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the official order
    else:
        assert np.bincount(train.labels).tolist() == [6000] * 10
    info = dataset_info(name)
    assert (info.channels, info.image_size, info.num_classes, info.augment) == (1, 28, 10, False)


@pytest.fixture(scope="session")
def cifar10(shared_data) -> dict[str, ArrayDataset]:
    """CIFAR-10 from the JPEG tar, decoded once for the whole session."""
    return {split: load_dataset("cifar10", split, shared_data) for split in ("train", "test")}


def test_cifar10_jpeg_tar(cifar10, shared_data, array_cache):
    for split, per_class in (("train", 5000), ("test", 1000)):
        data = cifar10[split]
        assert data.images.shape == (10 * per_class, 32, 32, 3) and data.images.dtype == np.uint8
        assert data.classes == CIFAR10_CLASSES
        assert np.bincount(data.labels).tolist() == [per_class] * 10
        assert 60 < data.images.mean() < 180  # real pictures, not blank
        # the entry keyed by this machine's source files (a kept cache may also hold entries of
        # the same files seen under other paths, e.g. another checkout)
        source = _REGISTRY["cifar10"].locate(resolve_data_root(shared_data), split)
        entry = cache.cache_path(f"cifar10-{split}", source.paths)
        assert entry.parent == array_cache and entry.is_file()
    again = load_dataset("cifar10", "test", shared_data)  # from the cache
    assert np.array_equal(again.images, cifar10["test"].images)
    assert np.array_equal(again.labels, cifar10["test"].labels)
    info = dataset_info("cifar10")
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225) and info.augment


def test_tiny_imagenet_val(shared_data):
    data = load_dataset("tiny-imagenet-val", "test", shared_data)
    assert data.images.shape == (10000, 32, 32, 3) and data.images.dtype == np.uint8
    assert len(data.classes) == 200 and np.bincount(data.labels).tolist() == [50] * 200
    gray = (data.images[..., 0] == data.images[..., 1]).all(axis=(1, 2)) & \
           (data.images[..., 1] == data.images[..., 2]).all(axis=(1, 2))
    assert 100 < gray.sum() < 300  # the 168 grayscale JPEGs became RGB
    assert dataset_info("tiny-imagenet-val").num_classes == 200


# ----------------------------------------------------------------------------------------------
# Official CIFAR python format, built here

LAYOUTS = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz", meta="batches.meta",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", names_key=b"label_names", classes=10),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz", meta="meta",
                     train=["train"], test=["test"],
                     label_key=b"fine_labels", names_key=b"fine_label_names", classes=100),
}


def official_rows(images: np.ndarray) -> np.ndarray:
    """The official row layout by its definition: the 1024 red values, then green, then blue, each row-major."""
    return np.concatenate([images[..., channel].reshape(len(images), 1024) for channel in range(3)], axis=1)


def make_cifar(root: Path, name: str, *, as_tar: bool, protocol: int = pickle.DEFAULT_PROTOCOL,
               seed: int = 0, batch_edit=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny copy of the official release (3 images per batch file); returns the true arrays per split."""
    layout, rng = LAYOUTS[name], np.random.default_rng(seed)
    staging = root / "staging" if as_tar else root
    folder = staging / layout["folder"]
    folder.mkdir(parents=True)
    truth = {}
    for split in ("train", "test"):
        parts = []
        for filename in layout[split]:
            images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, layout["classes"], 3)
            batch = {b"batch_label": filename.encode(), layout["label_key"]: labels.tolist(),
                     b"data": official_rows(images), b"filenames": [b"x.png"] * 3}
            if name == "cifar100":
                batch[b"coarse_labels"] = (labels // 5).tolist()
            if batch_edit is not None:
                batch_edit(filename, batch)
            (folder / filename).write_bytes(pickle.dumps(batch, protocol=protocol))
            parts.append((images, labels))
        truth[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    names = [f"class_{i}".encode() for i in range(layout["classes"])]
    (folder / layout["meta"]).write_bytes(pickle.dumps({layout["names_key"]: names}, protocol=protocol))
    if as_tar:
        with tarfile.open(root / layout["archive"], "w:gz") as tar:
            tar.add(folder, arcname=layout["folder"])
    return truth


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar"])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL], ids=["protocol2", "default-protocol"])
def test_official_cifar_read_back_exactly(tmp_path, name, as_tar, protocol):
    truth = make_cifar(tmp_path, name, as_tar=as_tar, protocol=protocol)
    for split, (images, labels) in truth.items():
        data = load_dataset(name, split, tmp_path)
        assert np.array_equal(data.images, images) and data.images.dtype == np.uint8
        assert np.array_equal(data.labels, labels) and data.labels.dtype == np.int64
        assert data.classes == [f"class_{i}" for i in range(LAYOUTS[name]["classes"])]
        rows = official_rows(images)
        # green value of row 1, column 2 sits at 1024 + 1*32 + 2 in the official row
        assert data.images[0, 1, 2, 1] == rows[0, 1024 + 32 + 2]
        assert data.images.flags.c_contiguous


def test_official_folder_wins_over_archive(tmp_path):
    from_tar = make_cifar(tmp_path, "cifar10", as_tar=True, seed=1)
    from_folder = make_cifar(tmp_path, "cifar10", as_tar=False, seed=2)
    data = load_dataset("cifar10", "test", tmp_path)
    assert np.array_equal(data.images, from_folder["test"][0])
    assert not np.array_equal(data.images, from_tar["test"][0])


@pytest.mark.parametrize("edit, message", [
    (lambda f, b: b.update({b"data": np.zeros((3, 100), np.uint8)}), "(N, 3072)"),
    (lambda f, b: b.update({b"labels": [0, 1]}), "integer labels"),
    (lambda f, b: b.update({b"labels": [0, 10, 1]}), "label 10 is out of range for 10 classes"),
    (lambda f, b: b.pop(b"data"), "b'data'"),
], ids=["shape", "label-count", "label-range", "no-data"])
def test_official_cifar_bad_batch(tmp_path, edit, message):
    make_cifar(tmp_path, "cifar10", as_tar=False, batch_edit=lambda f, b: edit(f, b) if f == "test_batch" else None)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", tmp_path)
    assert message in one_line(err) and str(tmp_path / "cifar-10-batches-py" / "test_batch") in str(err.value)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_official_cifar_pickle_cannot_run_code(tmp_path):
    make_cifar(tmp_path, "cifar10", as_tar=False)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(marker)}))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()


def test_official_cifar_missing_file_and_member(tmp_path):
    make_cifar(tmp_path / "a", "cifar10", as_tar=False)
    (tmp_path / "a" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", "train", tmp_path / "a")
    (tmp_path / "b").mkdir()
    with tarfile.open(tmp_path / "b" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "a" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match="has no member cifar-10-batches-py/data_batch_3"):
        load_dataset("cifar10", "train", tmp_path / "b")


def test_truncated_archive(tmp_path):
    make_cifar(tmp_path, "cifar10", as_tar=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", tmp_path)
    assert str(archive) in one_line(err)


# ----------------------------------------------------------------------------------------------
# Download


def test_download_verifies_checksum(tmp_path):
    assert ARCHIVES["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert ARCHIVES["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    truth = make_cifar(tmp_path / "server", "cifar10", as_tar=True)
    served = tmp_path / "server" / "cifar-10-python.tar.gz"
    md5 = hashlib.md5(served.read_bytes()).hexdigest()
    root = tmp_path / "root"

    wrong = {"cifar10": Archive(served.as_uri(), "0" * 32, "cifar-10-python.tar.gz")}
    with pytest.raises(DataError, match="checksum mismatch"):
        download_dataset("cifar10", root, archives=wrong)
    assert list(root.iterdir()) == []  # the bad download is gone

    right = {"cifar10": Archive(served.as_uri(), md5, "cifar-10-python.tar.gz")}
    path = download_dataset("cifar10", root, archives=right)
    assert path == root / "cifar-10-python.tar.gz" and [p.name for p in root.iterdir()] == [path.name]
    assert np.array_equal(load_dataset("cifar10", "test", root).images, truth["test"][0])
    # a verified copy is not fetched again (the URL now points nowhere)
    gone = {"cifar10": Archive((tmp_path / "nowhere.tar.gz").as_uri(), md5, "cifar-10-python.tar.gz")}
    assert download_dataset("cifar10", root, archives=gone) == path


def test_download_errors(tmp_path):
    with pytest.raises(ConfigError, match="cifar10, cifar100"):
        download_dataset("mnist", tmp_path)
    gone = {"cifar10": Archive((tmp_path / "nowhere.tar.gz").as_uri(), "0" * 32, "cifar-10-python.tar.gz")}
    with pytest.raises(DataError, match="could not download"):
        download_dataset("cifar10", tmp_path / "root", archives=gone)
    assert list((tmp_path / "root").iterdir()) == []


# ----------------------------------------------------------------------------------------------
# IDX files, built here


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes((0, 0, 8, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_idx(root: Path, *, gz: bool = True, images: bytes | None = None, labels: bytes | None = None,
             n: int = 5) -> dict[str, Path]:
    """Test-split Fashion-MNIST IDX files; `images`/`labels` replace the raw (uncompressed) contents."""
    rng = np.random.default_rng(0)
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"images": images if images is not None else idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
           "labels": labels if labels is not None else idx_bytes(np.arange(n, dtype=np.uint8))}
    paths = {}
    for kind, base in (("images", "t10k-images-idx3-ubyte"), ("labels", "t10k-labels-idx1-ubyte")):
        paths[kind] = folder / (base + ".gz" if gz else base)
        paths[kind].write_bytes(gzip.compress(raw[kind]) if gz else raw[kind])
    return paths


def test_idx_plain_names_accepted(tmp_path):
    make_idx(tmp_path, gz=False)
    data = load_dataset("fashion-mnist", "test", tmp_path)
    assert data.images.shape == (5, 28, 28, 1) and data.labels.tolist() == [0, 1, 2, 3, 4]


GOOD_IMAGES = idx_bytes(np.zeros((5, 28, 28), np.uint8))


@pytest.mark.parametrize("case, kind, message", [
    ("truncated-gz", "images", "cannot read"),
    ("not-gzip", "labels", "cannot read"),
    ("bad-magic", "images", "magic number 00000804"),
    ("short-data", "images", "truncated or corrupt"),
    ("count-mismatch", "labels", "has 4 labels"),
    ("label-range", "labels", "label 10 is out of range"),
    ("wrong-size", "images", "expected 28x28"),
])
def test_idx_corrupt(tmp_path, case, kind, message):
    if case == "bad-magic":
        paths = make_idx(tmp_path, images=bytes((0, 0, 8, 4)) + GOOD_IMAGES[4:])
    elif case == "short-data":
        paths = make_idx(tmp_path, images=GOOD_IMAGES[:-100])
    elif case == "count-mismatch":
        paths = make_idx(tmp_path, labels=idx_bytes(np.zeros(4, np.uint8)))
    elif case == "label-range":
        paths = make_idx(tmp_path, labels=idx_bytes(np.array([0, 1, 10, 2, 3], np.uint8)))
    elif case == "wrong-size":
        paths = make_idx(tmp_path, images=idx_bytes(np.zeros((5, 32, 32), np.uint8)))
    else:
        paths = make_idx(tmp_path)
        content = paths[kind].read_bytes()
        paths[kind].write_bytes(content[: len(content) // 2] if case == "truncated-gz" else b"not gzip at all")
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", "test", tmp_path)
    assert str(paths[kind]) in one_line(err) and message in str(err.value)


# ----------------------------------------------------------------------------------------------
# Image folders given by path


def save_image(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def make_folder(root: Path, *, top: str | None = "top", size: int = 8, channels: int = 3,
                classes=("dog", "cat"), per_class: int = 3, seed: int = 0) -> dict[str, ArrayDataset]:
    """PNG image folder (lossless); returns the expected data, classes sorted, files sorted."""
    rng, truth = np.random.default_rng(seed), {}
    base = root / top if top else root
    for split in ("train", "test"):
        images, labels = [], []
        for label, name in enumerate(sorted(classes)):
            for i in range(per_class):
                image = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
                save_image(base / split / name / f"{i:03d}.png", image)
                images.append(image)
                labels.append(label)
        truth[split] = ArrayDataset(np.stack(images), np.array(labels), sorted(classes))
    return truth


def tar_folder(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name)
    return archive


@pytest.mark.parametrize("top", ["top", None], ids=["with-top", "direct"])
@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar"])
@pytest.mark.parametrize("channels", [3, 1])
def test_image_folder(tmp_path, top, as_tar, channels):
    truth = make_folder(tmp_path / "src", top=top, channels=channels)
    name = str(tar_folder(tmp_path / "src", tmp_path / "set.tar.gz") if as_tar else tmp_path / "src")
    for split in ("train", "test"):
        data = load_dataset(name, split)
        assert np.array_equal(data.images, truth[split].images) and data.classes == ["cat", "dog"]
        assert np.array_equal(data.labels, truth[split].labels)
    info = dataset_info(name)
    images = truth["train"].images / 255.0
    assert (info.num_classes, info.channels, info.image_size, info.augment) == (2, channels, 8, channels == 3)
    assert np.allclose(info.mean, images.mean(axis=(0, 1, 2)), atol=1e-4)
    assert np.allclose(info.std, images.std(axis=(0, 1, 2)), atol=1e-4)


def test_image_folder_only_test_split(tmp_path):
    make_folder(tmp_path / "src")
    for path in (tmp_path / "src" / "top" / "train").rglob("*.png"):
        path.unlink()
    for path in sorted((tmp_path / "src" / "top" / "train").iterdir()):
        path.rmdir()
    (tmp_path / "src" / "top" / "train").rmdir()
    assert dataset_info(str(tmp_path / "src")).num_classes == 2
    with pytest.raises(DataError, match="no train split"):
        load_dataset(str(tmp_path / "src"), "train")


@pytest.mark.parametrize("as_tar", [False, True], ids=["folder", "tar"])
@pytest.mark.parametrize("problem", ["size", "channels", "empty-class", "corrupt"])
def test_image_folder_problems(tmp_path, as_tar, problem):
    make_folder(tmp_path / "src")
    split_dir = tmp_path / "src" / "top" / "train"
    offending = split_dir / "dog" / "001.png"
    if problem == "size":
        save_image(offending, np.zeros((9, 8, 3), np.uint8))
    elif problem == "channels":
        save_image(offending, np.zeros((8, 8, 1), np.uint8))
    elif problem == "corrupt":
        offending.write_bytes(b"\x89PNG but not really")
    else:
        offending = split_dir / "zebra"
        offending.mkdir()
    name = tar_folder(tmp_path / "src", tmp_path / "set.tar.gz") if as_tar else tmp_path / "src"
    with pytest.raises(DataError) as err:
        load_dataset(str(name), "train")
    relative = str(offending.relative_to(tmp_path / "src"))
    assert (relative if as_tar else str(offending)) in one_line(err)


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nope"), "train")


def test_cifar10_jpeg_folder_needs_the_cifar_classes(tmp_path):
    make_folder(tmp_path / "root" / "cifar10-jpeg", top=None, size=32)
    with pytest.raises(DataError, match="expected the class folders airplane"):
        load_dataset("cifar10", "train", tmp_path / "root")


# ----------------------------------------------------------------------------------------------
# Cache


class Decoded(Exception):
    """Raised by a patched decoder: proves the source was decoded rather than read from the cache."""


def test_cache_hit_invalidation_and_corruption(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ASBNN_CACHE", str(cache))
    truth = make_folder(tmp_path / "src")
    name = str(tmp_path / "src")
    first = load_dataset(name, "train")
    [entry] = cache.glob("*.npz")
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]

    def no_decoding(*args, **kwargs):
        raise Decoded

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", no_decoding)
        cached = load_dataset(name, "train")  # served from the cache: no image is opened
        assert np.array_equal(cached.images, first.images) and cached.classes == first.classes
        assert np.array_equal(cached.labels, first.labels)
        source = tmp_path / "src" / "top" / "train" / "cat" / "000.png"
        stat = source.stat()
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        with pytest.raises(Decoded):  # a touched source is decoded again
            load_dataset(name, "train")

    changed = np.full((8, 8, 3), 7, np.uint8)
    save_image(source, changed)
    assert np.array_equal(load_dataset(name, "train").images[0], changed)
    assert len(list(cache.glob("*.npz"))) == 1  # the entry was replaced, not duplicated

    expected = load_dataset(name, "train").images
    for corrupt in (b"garbage", entry.read_bytes()[: entry.stat().st_size // 2]):
        entry.write_bytes(corrupt)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.array_equal(load_dataset(name, "train").images, expected)
        with np.load(entry) as npz:  # rewritten whole
            assert np.array_equal(npz["images"], expected)
    assert np.array_equal(truth["test"].images, load_dataset(name, "test").images)


def test_unwritable_cache_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ASBNN_CACHE", str(blocker / "cache"))
    truth = make_folder(tmp_path / "src")
    with pytest.warns(UserWarning, match="could not write the array cache"):
        data = load_dataset(str(tmp_path / "src"), "train")
    assert np.array_equal(data.images, truth["train"].images)


# ----------------------------------------------------------------------------------------------
# DeviceLoader


def toy(n: int = 37, size: int = 8, seed: int = 0) -> ArrayDataset:
    """Random images whose label is their index, so every batch says which samples it holds."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArrayDataset(images, np.arange(n), [str(i) for i in range(n)])


PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output * 255 gives the uint8 pixels back


def as_uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_loader_shapes_and_lengths():
    data = toy()
    loader = DeviceLoader(data, 10, train=True, augment=True, **PLAIN)
    batches = list(loader.batches(torch.Generator().manual_seed(0)))
    assert len(loader) == len(batches) == 4 and loader.num_samples == 37
    assert [len(y) for _, y in batches] == [10, 10, 10, 7]
    x, y = batches[0]
    assert x.shape == (10, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    dropped = DeviceLoader(data, 10, train=True, augment=False, drop_last=True, **PLAIN)
    assert len(dropped) == len(list(dropped.batches())) == 3


def test_loader_normalises():
    image = np.empty((2, 4, 4, 3), np.uint8)
    image[...] = (100, 50, 200)
    mean, std = (100 / 255, 50 / 255, 200 / 255), (0.2, 0.3, 0.4)
    loader = DeviceLoader(ArrayDataset(image, np.zeros(2), ["a"]), 2, train=False, augment=False,
                          mean=mean, std=std)
    [(x, _)] = loader.batches()
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-5)
    data = toy()
    [(x, _)] = DeviceLoader(data, 37, train=False, augment=False, mean=mean, std=std).batches()
    expected = (data.images / 255.0 - np.array(mean)) / np.array(std)
    assert np.allclose(x.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)


def window_of(image: np.ndarray, padded: np.ndarray) -> tuple[int, int, bool] | None:
    """(dy, dx, flipped) of an HWC window of `padded` equal to `image`, or None."""
    h, w = image.shape[:2]
    for dy in range(padded.shape[0] - h + 1):
        for dx in range(padded.shape[1] - w + 1):
            window = padded[dy:dy + h, dx:dx + w]
            for flipped in (False, True):
                if np.array_equal(image, window[:, ::-1] if flipped else window):
                    return dy, dx, flipped
    return None


def test_loader_crops_are_translations_of_padded_images():
    data, pad = toy(), 4
    loader = DeviceLoader(data, 10, train=True, augment=True, crop_padding=pad, **PLAIN)
    padded = np.pad(data.images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    found = []
    for x, y in loader.batches(torch.Generator().manual_seed(3)):
        for image, label in zip(as_uint8(x), y.tolist()):
            match = window_of(image, padded[label])
            assert match is not None, f"sample {label} is not a window of its padded image"
            found.append(match)
    assert len({m[:2] for m in found}) > 10 and {m[2] for m in found} == {False, True}  # really random


def test_loader_real_cifar_batch(cifar10):
    """The same check on real pictures, with the paper's normalisation undone."""
    info, images = dataset_info("cifar10"), cifar10["test"].images[:500]
    data = ArrayDataset(images, np.arange(500), cifar10["test"].classes)  # label = index
    loader = DeviceLoader(data, 100, train=True, augment=True, mean=info.mean, std=info.std)
    x, index = next(loader.batches(torch.Generator().manual_seed(0)))
    assert x.shape == (100, 3, 32, 32) and index.shape == (100,)
    assert -2.2 < x.min() and x.max() < 2.7 and abs(x.mean()) < 1
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (info.std, info.mean))
    restored = (x * std + mean).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for image, i in zip(restored[:10], index[:10].tolist()):
        assert window_of(image, padded[i]) is not None


def test_loader_same_seed_same_batches():
    loader = DeviceLoader(toy(), 8, train=True, augment=True, **PLAIN)
    run = lambda seed: list(loader.batches(torch.Generator().manual_seed(seed)))  # noqa: E731
    first, again, other = run(5), run(5), run(6)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(first, other))


def test_loader_epoch_visits_every_sample_once():
    loader = DeviceLoader(toy(), 8, train=True, augment=True, **PLAIN)
    generator = torch.Generator().manual_seed(0)
    orders = [torch.cat([y for _, y in loader.batches(generator)]) for _ in range(2)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(37))
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    dropped = DeviceLoader(toy(), 8, train=True, augment=False, drop_last=True, **PLAIN)
    seen = torch.cat([y for _, y in dropped.batches(generator)]).tolist()
    assert len(seen) == 32 and len(set(seen)) == 32


def test_loader_eval_is_ordered_and_untouched():
    data = toy()
    loader = DeviceLoader(data, 10, train=False, augment=True, **PLAIN)  # augment is ignored for eval
    epochs = [list(loader.batches()) for _ in range(2)]
    for batches in epochs:
        assert torch.cat([y for _, y in batches]).tolist() == list(range(37))
        assert np.array_equal(np.concatenate([as_uint8(x) for x, _ in batches]), data.images)


def test_loader_bad_arguments():
    data = toy()
    for size in (0, -3):
        with pytest.raises(ConfigError, match="positive"):
            DeviceLoader(data, size, train=True, augment=False, **PLAIN)
    with pytest.raises(ConfigError) as err:
        DeviceLoader(data, 38, train=True, augment=False, **PLAIN)
    assert "38" in one_line(err) and "37" in str(err.value)
    with pytest.raises(ConfigError, match="one value per channel"):
        DeviceLoader(data, 8, train=True, augment=False, mean=(0.5,), std=(1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="std must be positive"):
        DeviceLoader(data, 8, train=True, augment=False, mean=(0, 0, 0), std=(1.0, 0.0, 1.0))


@pytest.mark.parametrize("channels", [1, 3])
def test_loader_batches_have_canonical_nchw_strides(channels):
    """One-channel batches must not carry channels_last-like strides (a much slower CPU path)."""
    images = np.zeros((8, 6, 6, channels), dtype=np.uint8)
    data = ArrayDataset(images=images, labels=np.zeros(8, dtype=np.int64), classes=["a"])
    loader = DeviceLoader(data, 4, train=True, mean=(0.5,) * channels, std=(0.5,) * channels, augment=False)
    x, _ = next(loader.batches(torch.Generator().manual_seed(0)))
    assert x.stride() == torch.empty(x.shape).stride()


@pytest.mark.parametrize("channels", [1, 3])
def test_loader_channels_last_changes_the_layout_only(channels):
    """channels_last batches hold the same values in NHWC strides; one-channel ones stay plain NCHW."""
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 256, (20, 6, 6, channels), dtype=np.uint8), np.arange(20), ["a"] * 20)
    kwargs = dict(mean=(0.5,) * channels, std=(0.25,) * channels, augment=True, crop_padding=2)
    plain = DeviceLoader(data, 8, train=True, **kwargs)
    nhwc = DeviceLoader(data, 8, train=True, channels_last=True, **kwargs)
    for (xa, ya), (xb, yb) in zip(plain.batches(torch.Generator().manual_seed(1)),
                                  nhwc.batches(torch.Generator().manual_seed(1))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        if channels == 1:
            assert xb.stride() == torch.empty(xb.shape).stride()
        else:
            assert xb.is_contiguous(memory_format=torch.channels_last) and not xb.is_contiguous()
