"""SVHN in its official MATLAB 5 format, written by the test (no copy of SVHN is offline)."""

import struct
import zlib

import numpy as np
import pytest

from asbnn.data import dataset_info, load_dataset
from asbnn.errors import DataError


def element(kind: int, payload: bytes) -> bytes:
    return struct.pack("<II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def matrix(name: str, array: np.ndarray, mx_class: int, mi_type: int) -> bytes:
    body = (element(6, struct.pack("<II", mx_class, 0)) + element(5, np.array(array.shape, "<i4").tobytes())
            + element(1, name.encode()) + element(mi_type, array.tobytes(order="F")))
    return element(14, body)


def write_mat(path, variables: list[bytes], compress: bool) -> None:
    header = b"MATLAB 5.0 MAT-file, written by asbnn's tests".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    parts = []
    for var in variables:
        if compress:
            packed = zlib.compress(var)
            parts.append(struct.pack("<II", 15, len(packed)) + packed)
        else:
            parts.append(var)
    path.write_bytes(header + b"".join(parts))


def svhn_arrays(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(1, 11, n)  # 1..10, 10 meaning the digit 0
    x = np.asfortranarray(images.transpose(1, 2, 3, 0))  # the release stores X as 32x32x3xN
    return images, labels, matrix("X", x, 9, 2), matrix("y", labels.astype("<f8").reshape(n, 1), 6, 9)


@pytest.mark.parametrize("compress", [False, True])
def test_svhn_reads_back_exactly(tmp_path, compress):
    (tmp_path / "svhn").mkdir()
    for split, n in (("train", 7), ("test", 5)):
        images, labels, x, y = svhn_arrays(n, seed=n)
        write_mat(tmp_path / "svhn" / f"{split}_32x32.mat", [x, y], compress)
        data = load_dataset("svhn", split, tmp_path)
        assert np.array_equal(data.images, images)
        assert np.array_equal(data.labels, labels % 10) and data.classes[0] == "0"
    assert dataset_info("svhn").augment is False


def test_svhn_errors_name_the_file(tmp_path):
    (tmp_path / "svhn").mkdir()
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", "train", tmp_path)
    path = tmp_path / "svhn" / "test_32x32.mat"
    _, _, x, y = svhn_arrays(3, seed=0)
    write_mat(path, [x, y], compress=False)
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    with pytest.raises(DataError, match="truncated"):
        load_dataset("svhn", "test", tmp_path)
    path.write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="MATLAB 5"):
        load_dataset("svhn", "test", tmp_path)
    write_mat(path, [x], compress=False)
    with pytest.raises(DataError, match="lacks the variables"):
        load_dataset("svhn", "test", tmp_path)
