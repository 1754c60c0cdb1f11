"""Tar members written directly, byte for byte as webdataset's TarWriter (Python's tarfile) writes them.

tarfile builds a ``TarInfo`` object per member, copies it, and formats and checksums all of its fields: about
20 us per member, more than the sharder spends on the sample itself. A member here is a fixed 512-byte ustar
header in which only the name, the size and the checksum change, then the data padded to 512 bytes; the
archive ends with two zero blocks, padded to tarfile's 10 KiB record size. The fields (mode 0444, owner
``bigdata``, mtime 0, POSIX ``ustar`` magic) are those of our ShardWriter settings, so shards are identical
to the ones ShardWriter wrote (tests/test_tar_format.py compares them) and ``tar`` and ``webdataset`` read
them as before.
"""

from __future__ import annotations

import numpy as np

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads a closed archive to a multiple of this


def _template() -> bytearray:
    header = bytearray(BLOCK)
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime 0: the same samples give the same bytes
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[265:272] = b"bigdata"  # uname
    header[297:304] = b"bigdata"  # gname
    return header


_TEMPLATE = _template()
_HEAD = bytes(_TEMPLATE[100:124])
_MID = bytes(_TEMPLATE[136:148])
_TAIL = bytes(_TEMPLATE[156:BLOCK])
# The checksum is the byte sum of the header with its own field read as spaces: the fixed part once.
_FIXED_SUM = sum(_TEMPLATE) + 8 * ord(" ")
_PADDING = [b"\0" * ((BLOCK - n % BLOCK) % BLOCK) for n in range(BLOCK)]
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
MAX_SIZE = 8**11 - 1  # the largest size an 11-digit octal field holds (8 GiB); larger needs a pax header


def member(name: str, data: bytes) -> bytes:
    """One regular-file member: header, data, zero padding to the next block."""
    raw_name = name.encode("ascii")
    size = len(data)
    if len(raw_name) > 100 or size > MAX_SIZE:  # tarfile would add a pax header; the sharder never needs one
        raise ValueError(f"tar member {name!r} ({size} bytes) does not fit a plain ustar header")
    size_field = b"%011o\0" % size
    checksum = _FIXED_SUM + sum(raw_name) + sum(size_field)
    return b"".join(
        (
            raw_name,
            b"\0" * (100 - len(raw_name)),
            _HEAD,
            size_field,
            _MID,
            b"%06o\0 " % checksum,
            _TAIL,
            data,
            _PADDING[size % BLOCK],
        )
    )


def archive_end(size: int) -> bytes:
    """What closes an archive of ``size`` bytes of members: two zero blocks, then padding to a full record."""
    total = size + len(END_OF_ARCHIVE)
    return END_OF_ARCHIVE + b"\0" * ((RECORD - total % RECORD) % RECORD)


def numbered_names(prefix: str, count: int, suffix: str, digits: int = 7) -> np.ndarray:
    """``f"{prefix}{i:0{digits}d}{suffix}"`` for ``i < count``, as a (count, length) array of ASCII codes."""
    if count >= 10**digits:
        raise ValueError(f"{count} names do not fit {digits} digits")
    base = np.frombuffer(f"{prefix}{'0' * digits}{suffix}".encode("ascii"), dtype=np.uint8)
    names = np.tile(base, (count, 1))
    powers = 10 ** np.arange(digits - 1, -1, -1)
    names[:, len(prefix) : len(prefix) + digits] = ord("0") + np.arange(count)[:, None] // powers % 10
    return names


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """(N, digits) ASCII octal digits of ``values``, most significant first."""
    return ord("0") + ((values[:, None] >> (3 * np.arange(digits - 1, -1, -1))) & 7)


def pack(names: np.ndarray, sizes: np.ndarray, *payload: np.ndarray) -> np.ndarray:
    """Members ``names[i]`` whose data is row ``i`` of the ``payload`` arrays side by side, cut to ``sizes[i]``
    bytes (the rows must be zero after that): the bytes ``member`` gives for each, joined, built for all at
    once. Each member is a row of header block + data blocks; when members use different numbers of blocks the
    unused ones are dropped (block-sized copies, no per-byte index)."""
    num = len(names)
    sizes = np.asarray(sizes, dtype=np.int64)
    if names.shape[1] > 100 or (num and sizes.max() > MAX_SIZE):
        raise ValueError("a tar member does not fit a plain ustar header")
    blocks = 1 + -(-sizes // BLOCK)  # header + data blocks per member
    most = int(blocks.max()) if num else 1
    grid = np.empty((num, most * BLOCK), dtype=np.uint8)
    grid[:, :BLOCK] = np.frombuffer(bytes(_TEMPLATE), dtype=np.uint8)
    grid[:, : names.shape[1]] = names
    grid[:, 124:135] = _octal(sizes, 11)
    checksum = _FIXED_SUM + names.sum(axis=1, dtype=np.int64) + grid[:, 124:135].sum(axis=1, dtype=np.int64)
    grid[:, 148:154] = _octal(checksum, 6)
    grid[:, 155] = ord(" ")  # 154 stays NUL: "%06o\0 "
    at = BLOCK
    for part in payload:
        width = min(part.shape[1], grid.shape[1] - at)  # beyond the longest payload the rows hold only zeros
        grid[:, at : at + width] = part[:, :width]
        at += width
    grid[:, at:] = 0
    if (blocks == most).all():
        return grid.reshape(-1)
    return grid.reshape(num, most, BLOCK)[np.arange(most) < blocks[:, None]].reshape(-1)
