"""Our tar members against webdataset's TarWriter (Python's tarfile): the same bytes, read back by both."""

from __future__ import annotations

import io
import random
import tarfile

import numpy as np
import pytest
import webdataset as wds

from pipeline.preprocess.tar_format import archive_end, member, numbered_names, pack


def reference(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, encoder=False, mtime=0)  # the settings our ShardWriter used
    for sample in samples:
        writer.write(sample)
    writer.close()
    return buf.getvalue()


def ours(samples: list[dict]) -> bytes:
    parts = [member(f"{s['__key__']}.{field}", s[field]) for s in samples for field in sorted(s) if field != "__key__"]
    body = b"".join(parts)
    return body + archive_end(len(body))


@pytest.mark.parametrize("seed", range(6))
def test_members_are_byte_identical_to_tarfile(seed):
    gen = random.Random(seed)
    sizes = [0, 1, 511, 512, 513, 1024, 10_239, 10_240, 70_000]
    samples = []
    for i in range(gen.randint(1, 40)):
        key = f"{gen.randint(0, 999_999):06d}-{gen.randint(0, 99_999):05d}-{i:07d}"
        sample = {"__key__": key, "bert.npy": gen.randbytes(gen.choice([*sizes, gen.randint(0, 3000)]))}
        if gen.random() < 0.3:
            sample["mlm.npy"] = gen.randbytes(gen.randint(0, 700))
        samples.append(sample)
    data = ours(samples)
    assert data == reference(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    assert names == [f"{s['__key__']}.{f}" for s in samples for f in sorted(s) if f != "__key__"]


def test_members_that_need_a_pax_header_are_refused():
    with pytest.raises(ValueError, match="plain ustar header"):
        member("x" * 101, b"")


@pytest.mark.parametrize("seed", range(4))
def test_packed_members_equal_member_by_member(seed):
    gen = np.random.default_rng(seed)
    num = int(gen.integers(1, 300))
    sizes = gen.choice([0, 1, 300, 511, 512, 513, 1200, 3000], size=num)
    payloads = np.zeros((num, int(sizes.max()) + int(gen.integers(0, 700))), dtype=np.uint8)
    for i, size in enumerate(sizes):
        payloads[i, :size] = gen.integers(0, 256, size)
    names = numbered_names("000042-00003-", num, ".bert.npy")
    expected = b"".join(
        member(f"000042-00003-{i:07d}.bert.npy", payloads[i, :size].tobytes()) for i, size in enumerate(sizes)
    )
    packed = pack(names, sizes, payloads[:, :7], payloads[:, 7:])  # payload given as two columns side by side
    assert packed.tobytes() == expected
