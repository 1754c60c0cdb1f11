"""A shard's samples, read member by member from its tar stream, and found again after damage.

Python's tarfile (and webdataset, which reads through it) ends a stream at the first header it cannot parse, so
a few KiB of garbage in the middle of a shard lose every sample after them. A tar stream is a sequence of
512-byte blocks in which every member starts on a block boundary with a header that carries its own checksum
and the ``ustar`` magic: after a bad header this reader scans forward block by block to the next block that has
both (what ``tar --ignore-zeros`` and recovery tools do) and continues there.

Members are grouped into samples as webdataset groups them (consecutive members whose names share the part
before the first dot of the base name: ``<key>.bert.npy``). Each sample comes with its ordinal in the shard, to
which the epoch plan's positions refer. Before any damage the ordinal is the count of samples read, exactly as
before; after damage it comes from the sample's key, which must then end in a number that counted up by one
with every sample before the damage (``<job>-<unit>-<index>``, what the sharder writes). Without such keys, or
when the damage comes before the shard's first sample, the rest of the shard is left unread, as it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

BLOCK = 512
_ZERO = bytes(BLOCK)
_KEY_NUMBER = re.compile(r"(.*?)(\d+)")  # a key's text and its trailing number
_PAX_PATH = re.compile(rb"\d+ path=([^\n]*)\n")


class TarDamage(ValueError):
    """A part of a tar stream that is not what a tar writer writes (bad header, data cut off)."""


def _header(block: bytes) -> tuple[str, int, bytes] | None:
    """``(name, size, type flag)`` of a ustar header block, or None when the block is not one."""
    if block[257:262] != b"ustar":
        return None
    try:
        stored = int(block[148:156].strip(b"\0 ") or b"-1", 8)
    except ValueError:
        return None
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in block):  # old signed-sum writers
        return None
    size_field = block[124:136]
    if size_field[0] & 0x80:  # base-256 (GNU, members over 8 GiB)
        size = int.from_bytes(size_field[1:], "big")
    else:
        try:
            size = int(size_field.strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:263] == b"ustar\0" else b""
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "replace"), size, block[156:157]


def tar_members(fh, on_damage: Callable[[TarDamage], None]) -> Iterator[tuple[str, bytes] | None]:
    """``(name, data)`` of every regular file in the stream, and ``None`` where damage was skipped.

    ``on_damage`` is told of each damaged region once (it may raise to stop reading).
    """
    offset = 0
    scanning = False  # after a bad header: looking for the next good one
    zeros_at = -1  # a zero block where a header belongs: the end of the archive, unless a header follows
    long_name = None  # the name a GNU long-name or pax header gives the next member
    while True:
        block = fh.read(BLOCK)
        if len(block) < BLOCK:
            if scanning:
                return  # the damage reached the end of the file: nothing after it to recover
            if block or zeros_at < 0:  # a cut-off block, or no end-of-archive blocks: the file was cut
                on_damage(TarDamage(f"the tar stream ends at byte {offset + len(block)} without its end blocks"))
            return
        header = _header(block)
        if header is None:
            if block == _ZERO and not scanning:
                if zeros_at < 0:
                    zeros_at = offset
            elif not scanning:
                scanning, zeros_at = True, -1  # zeros, then garbage: one damaged region
                on_damage(TarDamage(f"no valid tar header at byte {offset}: skipping to the next one"))
            offset += BLOCK
            continue
        if zeros_at >= 0:  # zero blocks in the middle: a zeroed region, not the end
            on_damage(TarDamage(f"zero blocks from byte {zeros_at} to {offset} inside the tar stream"))
            zeros_at = -1
            scanning = True
        if scanning:
            scanning = False
            long_name = None
            yield None
        name, size, kind = header
        offset += BLOCK
        data = fh.read(size)
        padding = -size % BLOCK
        if len(data) < size or len(fh.read(padding)) < padding:
            on_damage(TarDamage(f"member {name} is cut off at the end of the file (byte {offset + len(data)})"))
            return
        offset += size + padding
        if kind in (b"0", b"\0", b"7"):  # regular files
            yield long_name or name, data
            long_name = None
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind == b"x":  # pax extended header: its path names the next member
            found = _PAX_PATH.search(data)
            long_name = found.group(1).decode("utf-8", "replace") if found else None
        # directories, links, pax global headers: nothing to read


def _split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` as webdataset splits a member name: the key ends at the base name's first dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def tar_samples(path: str, on_error: Callable[[BaseException], object]) -> Iterator[tuple[int, dict]]:
    """``(ordinal in the shard, sample)`` for the samples of the tar shard ``path``, in order.

    A sample is webdataset's dict (``__key__``, ``__url__`` and one entry of bytes per extension). Damage is
    reported to ``on_error`` (which may raise): a file that cannot be opened, each damaged region. Where the
    samples after a damaged region cannot be placed, the rest of the shard is left unread (and logged).
    """
    try:
        fh = open(path, "rb", buffering=1 << 16)  # noqa: SIM115 - closed below, also when the caller stops early
    except OSError as exc:
        on_error(exc)
        return
    ordinal = -1
    numbering: tuple[str, int] | None = None  # (key text, key number - ordinal) while the keys count up by one
    damaged = False
    current: dict | None = None

    def place(sample: dict) -> int | None:
        """The sample's ordinal, or None when it cannot be placed (after damage, without counting keys)."""
        nonlocal ordinal, numbering, damaged
        match = _KEY_NUMBER.fullmatch(sample["__key__"])
        number = (match.group(1), int(match.group(2))) if match else None
        if damaged:
            damaged = False
            if numbering is None or number is None or number[0] != numbering[0]:
                return None
            if number[1] - numbering[1] <= ordinal:
                return None
            ordinal = number[1] - numbering[1]
            return ordinal
        ordinal += 1
        if ordinal == 0:
            numbering = (number[0], number[1]) if number else None
        elif numbering is not None and number != (numbering[0], numbering[1] + ordinal):
            numbering = None  # keys that do not count: samples after damage could not be placed
        return ordinal

    try:
        for item in tar_members(fh, on_error):
            if item is None:  # damage skipped: the sample being gathered may be incomplete
                if current is not None:
                    at = place(current)
                    if at is None:
                        _unplaced(path, current)
                        break
                    yield at, current
                    current = None
                damaged = True
                if ordinal < 0:  # no sample before the damage: the keys' numbering is unknown
                    log.warning("%s: damaged before its first sample; the rest of the shard is not read", path)
                    break
                continue
            split = _split_name(item[0])
            if split is None:
                continue
            key, extension = split
            if current is not None and (current["__key__"] != key or extension in current):
                at = place(current)
                if at is None:
                    _unplaced(path, current)
                    current = None
                    break
                yield at, current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": path}
            current[extension] = item[1]
        else:
            if current is not None:
                at = place(current)
                if at is not None:
                    yield at, current
                else:
                    _unplaced(path, current)
    finally:
        fh.close()


def _unplaced(path: str, sample: dict) -> None:
    log.warning("%s: sample %s after damage cannot be placed (its key does not continue the shard's numbering); "
                "the rest of the shard is not read", path, sample["__key__"])  # fmt: skip
