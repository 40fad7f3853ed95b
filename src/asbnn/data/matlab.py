"""A reader for MATLAB 5 `.mat` files holding numeric arrays, as SVHN ships them (no scipy needed).

Layout: a 128-byte header, then data elements, each an 8-byte tag (type, byte count) and a body
padded to 8 bytes; a "small" element packs both into 4 bytes. An array is an miMATRIX element
holding flags, dimensions, name and the real part (column-major); an miCOMPRESSED element holds
one such element deflated with zlib.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

_MI_DTYPES = {1: "i1", 2: "u1", 3: "<i2", 4: "<u2", 5: "<i4", 6: "<u4", 7: "<f4", 9: "<f8", 12: "<i8", 13: "<u8"}
_MI_INT32, _MI_MATRIX, _MI_COMPRESSED = 5, 14, 15
_NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE_CLASS .. mxUINT64_CLASS


def read_mat(path: Path) -> dict[str, np.ndarray]:
    """Every numeric array of a MATLAB 5 file by name; other variables (cells, structs) are skipped."""
    data = path.read_bytes()
    if len(data) < 128 or data[126:128] != b"IM":
        raise DataError(f"{path} is not a little-endian MATLAB 5 .mat file")
    arrays, pos = {}, 128
    while pos < len(data):
        kind, body, pos = _element(data, pos, path)
        if kind == _MI_COMPRESSED:
            try:
                kind, body, _ = _element(zlib.decompress(body), 0, path)
            except zlib.error as err:
                raise DataError(f"{path}: a compressed variable is corrupt ({err})") from None
        if kind == _MI_MATRIX:
            named = _matrix(body, path)
            if named is not None:
                arrays[named[0]] = named[1]
    return arrays


def _element(buf: bytes, pos: int, path: Path) -> tuple[int, bytes, int]:
    """(type, body, position of the next element) of the data element at `pos`."""
    if pos + 8 > len(buf):
        raise DataError(f"{path} is truncated (a data element's tag is cut off)")
    kind, size = struct.unpack_from("<II", buf, pos)
    if kind >> 16:  # small element: type in the low half, byte count in the high half, data in 4 bytes
        return kind & 0xFFFF, buf[pos + 4:pos + 4 + (kind >> 16)], pos + 8
    end = pos + 8 + size
    if end > len(buf):
        raise DataError(f"{path} is truncated (an element of {size} bytes runs past the end)")
    next_pos = end if kind == _MI_COMPRESSED else pos + 8 + -(-size // 8) * 8
    return kind, buf[pos + 8:end], next_pos


def _matrix(body: bytes, path: Path) -> tuple[str, np.ndarray] | None:
    _, flags, pos = _element(body, 0, path)
    if len(flags) < 4 or struct.unpack_from("<I", flags)[0] & 0xFF not in _NUMERIC_CLASSES:
        return None
    kind, dims, pos = _element(body, pos, path)
    _, name, pos = _element(body, pos, path)
    real_kind, real, _ = _element(body, pos, path)
    if kind != _MI_INT32 or real_kind not in _MI_DTYPES:
        raise DataError(f"{path}: variable {name!r} is not a plain numeric array")
    shape = tuple(int(d) for d in np.frombuffer(dims, "<i4"))
    values = np.frombuffer(real, _MI_DTYPES[real_kind])
    if values.size != int(np.prod(shape)):
        raise DataError(f"{path}: variable {name.decode(errors='replace')!r} holds {values.size} values, "
                        f"its dimensions {shape} say {int(np.prod(shape))}")
    return name.decode("ascii", errors="replace"), values.reshape(shape, order="F")
