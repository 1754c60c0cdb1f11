"""Decoding the shards' ``.npy`` members fast.

``np.load`` costs ~20 us per small array (a BytesIO, the header parsed as a Python literal), about as much as
reading the tar member itself. The header of a given dtype and shape is the same bytes every time, so it is
parsed once (by numpy's own reader) and the array is a view of the member's bytes.
"""

from __future__ import annotations

import io

import numpy as np

_MAGIC = b"\x93NUMPY"
_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}
_MAX_CACHED = 4096  # distinct (dtype, shape) headers: BERT samples have one per length


def npy_array(data: bytes) -> np.ndarray:
    """The (read-only) array stored in an .npy file's bytes; ValueError when they are not a plain array."""
    if len(data) < 10 or data[:6] != _MAGIC:
        raise ValueError("not an .npy array")
    size_bytes = 2 if data[6] == 1 else 4  # header length field: 2 bytes in format 1.0, 4 in 2.0 and 3.0
    start = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
    header = data[:start]
    parsed = _HEADERS.get(header)
    if parsed is None:
        fh = io.BytesIO(header)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if dtype.hasobject or (fortran and len(shape) > 1):
            raise ValueError(f"unsupported .npy array (dtype {dtype}, fortran order {fortran})")
        parsed = (dtype, shape, int(np.prod(shape)))
        if len(_HEADERS) < _MAX_CACHED:
            _HEADERS[header] = parsed
    dtype, shape, count = parsed
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)
