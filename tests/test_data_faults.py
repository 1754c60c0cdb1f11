"""Bad shards: excluded at start with a count, replaced (and counted) when damage shows while reading, fatal
with ``on_bad_shard=fail``; never a hang, never unequal batch counts."""

from __future__ import annotations

import random
import tarfile

import pytest
import torch
import webdataset as wds

from data_shards import build_shards, copy_shards, keys_by_shard, manifest
from pipeline.data import DataConfig, PretrainLoader
from pipeline.data.reader import ShardReadError
from pipeline.errors import UserError

pytestmark = pytest.mark.timeout(120)  # a hang is the failure these tests guard against


@pytest.fixture(scope="session")
def bert_shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.getbasetemp() / "data", small_tokenizer, "bert")


@pytest.fixture
def shards(bert_shards, tmp_path):
    """A private copy to damage."""
    return copy_shards(bert_shards, tmp_path / "shards")


def loader_for(shards, rank=0, world_size=2, **cfg):
    cfg = {"num_workers": 2, "shuffle_window": 200, **cfg}
    return PretrainLoader(
        DataConfig(shards=str(shards), **cfg),
        micro_batch_size=16,
        rank=rank,
        world_size=world_size,
        seed=3,
        with_keys=True,
    )


def run_epoch(loader, epoch=0):
    keys, count = [], 0
    for batch in loader.iterate(epoch):
        assert batch["input_ids"].shape[0] == 16
        keys += loader.last_keys
        count += 1
    assert count == loader.batches_per_epoch
    return keys


def biggest_shards(shards, n):
    return sorted(manifest(shards)["shards"], key=lambda e: -e["samples"])[:n]


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def readable_samples(path) -> int:
    """How many samples plain webdataset gets out of a damaged shard (skipping the error)."""
    count = 0
    for _ in wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples(handler=lambda e: True)):
        count += 1
    return count


def lost_used_positions(loader, epoch, shard_name, readable) -> int:
    """Used positions of the epoch whose sample lies beyond what is readable in ``shard_name``."""
    plan = loader.plan(epoch)
    index = [s.name for s in loader.shard_set.shards].index(shard_name)
    return sum(1 for p in range(plan.samples_used) if plan.locate(p)[0] == index and plan.locate(p)[1] >= readable)


def test_missing_and_truncated_shards_are_excluded_at_start(shards):
    missing, short = biggest_shards(shards, 2)
    (shards / missing["name"]).unlink()
    truncate(shards / short["name"])
    loaders = [loader_for(shards, rank=r) for r in range(2)]
    bad = dict(loaders[0].shard_set.bad)
    assert bad[missing["name"]] == "missing" and bad[short["name"]].startswith("size ")
    assert loaders[0].stats["shards_excluded"] == 2 and loaders[0].describe()["shards_excluded"] == sorted(bad)
    total = manifest(shards)["totals"]["samples"]
    assert (
        loaders[0].samples_per_epoch + loaders[0].samples_dropped_per_epoch
        == total - missing["samples"] - short["samples"]
    )
    seen = run_epoch(loaders[0]) + run_epoch(loaders[1])
    assert len(seen) == len(set(seen)) == loaders[0].samples_per_epoch
    short_keys = [
        s["__key__"] for s in wds.WebDataset(str(shards / short["name"]), nodesplitter=None, shardshuffle=False)
    ]
    assert short_keys and not set(seen) & set(short_keys)
    assert loaders[0].stats["read_errors"] == loaders[0].stats["samples_substituted"] == 0


def test_fail_mode_refuses_bad_shards_at_start(shards):
    (missing,) = biggest_shards(shards, 1)
    (shards / missing["name"]).unlink()
    with pytest.raises(
        UserError, match=rf"1 of \d+ shards are unusable .*{missing['name']}: missing.*on_bad_shard=fail"
    ):
        loader_for(shards, on_bad_shard="fail")


def test_sha256_check_catches_damage_of_the_same_size(shards):
    (entry,) = biggest_shards(shards, 1)
    path = shards / entry["name"]
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert loader_for(shards, verify_shards="size").shard_set.bad == []
    assert loader_for(shards, verify_shards="sha256").shard_set.bad == [
        (entry["name"], "sha256 differs from the manifest")
    ]


def test_shard_truncated_while_training_is_replaced_and_counted(shards):
    loaders = [loader_for(shards, rank=r) for r in range(2)]  # the start-up check passed
    (entry,) = biggest_shards(shards, 1)
    truncate(shards / entry["name"], 0.4)
    readable = readable_samples(shards / entry["name"])
    assert 0 < readable < entry["samples"]
    seen = run_epoch(loaders[0]) + run_epoch(loaders[1])  # equal counts: run_epoch checks each rank's
    substituted = sum(ld.stats["samples_substituted"] for ld in loaders)
    assert substituted == lost_used_positions(loaders[0], 0, entry["name"], readable) > 0
    assert sum(ld.stats["read_errors"] for ld in loaders) >= 1
    assert len(seen) == loaders[0].samples_per_epoch and len(set(seen)) == len(seen) - substituted


def test_resume_is_exact_with_a_damaged_shard(shards):
    (entry,) = biggest_shards(shards, 1)
    truncate(shards / entry["name"], 0.4)
    full = list(loader_for(shards, world_size=1, verify_shards="none").iterate(0))
    resumed = list(loader_for(shards, world_size=1, verify_shards="none").iterate(0, 41))
    assert len(resumed) == len(full) - 41
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full[41:], resumed, strict=True) for k in a)


def test_corrupt_member_is_replaced(shards):
    (entry,) = biggest_shards(shards, 1)
    path = shards / entry["name"]
    with tarfile.open(path) as tar:
        member = tar.getmembers()[10]
    data = bytearray(path.read_bytes())
    # ids beyond the vocabulary (the tar and the file size stay intact): the decoder's check must catch them
    data[member.offset_data + 128 + 4 : member.offset_data + 128 + 20] = b"\xff" * 16
    path.write_bytes(bytes(data))
    loader = loader_for(shards, world_size=1)
    plan = loader.plan(0)
    index = [s.name for s in loader.shard_set.shards].index(entry["name"])
    used = any(plan.locate(p) == (index, 10) for p in range(plan.samples_used))
    run_epoch(loader)
    assert loader.stats["read_errors"] == loader.stats["samples_substituted"] == int(used)


def test_shard_deleted_while_training_fills_whole_windows(shards):
    loaders = [loader_for(shards, rank=r, shuffle_window=40) for r in range(2)]
    (entry,) = biggest_shards(shards, 1)
    (shards / entry["name"]).unlink()  # whole windows now have no readable sample at all
    for ld in loaders:
        run_epoch(ld)
    substituted = sum(ld.stats["samples_substituted"] for ld in loaders)
    assert substituted == lost_used_positions(loaders[0], 0, entry["name"], 0) > 40


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fail_mode_stops_on_damage_found_while_reading(shards, num_workers):
    loader = loader_for(shards, world_size=1, on_bad_shard="fail", num_workers=num_workers)
    for entry in manifest(shards)["shards"]:
        truncate(shards / entry["name"], 0.5)
    with pytest.raises(ShardReadError, match="on_bad_shard=fail"):
        for _ in loader.iterate(0):
            pass


def test_no_readable_sample_anywhere_is_an_error_not_a_hang(shards):
    loader = loader_for(shards, world_size=1, num_workers=0)
    for entry in manifest(shards)["shards"]:
        (shards / entry["name"]).unlink()
    with pytest.raises(ShardReadError, match="no readable sample"):
        next(iter(loader.iterate(0)))


def overwrite_with_garbage(path, at: int, size: int = 4096, seed: int = 16) -> list[str]:
    """``size`` bytes of garbage from byte ``at`` (not block-aligned, as a bad disk sector or a stray write);
    returns the keys of the samples with a header or data byte in that range (padding may be hit harmlessly)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    data = bytearray(path.read_bytes())
    data[at : at + size] = random.Random(seed).randbytes(size)
    path.write_bytes(bytes(data))
    return [m.name.split(".")[0] for m in members if m.offset < at + size and at < m.offset_data + m.size]


def used_ordinals(loader, epoch, shard_name) -> set[int]:
    plan = loader.plan(epoch)
    index = [s.name for s in loader.shard_set.shards].index(shard_name)
    return {plan.locate(p)[1] for p in range(plan.samples_used) if plan.locate(p)[0] == index}


def test_garbage_inside_a_shard_loses_only_the_samples_it_covers(shards):
    (entry,) = biggest_shards(shards, 1)
    keys = keys_by_shard(shards)[entry["name"]]
    path = shards / entry["name"]
    damaged = overwrite_with_garbage(path, path.stat().st_size // 2 + 100)
    assert 1 <= len(damaged) <= 10 and damaged[-1] != keys[-1]
    assert readable_samples(path) <= keys.index(damaged[0]) + 1  # plain tarfile / webdataset stop at the damage
    loader = loader_for(shards, world_size=1)  # the size check at start passes: the damage is found by reading
    seen = run_epoch(loader)
    used = used_ordinals(loader, 0, entry["name"])
    lost = {keys.index(k) for k in damaged} & used
    after = {i for i in used if i > keys.index(damaged[-1])}
    assert after and {keys[i] for i in after} <= set(seen)  # every sample after the damage is read
    assert {keys[i] for i in used - lost} <= set(seen) and not {keys[i] for i in lost} & set(seen)
    assert loader.stats["read_errors"] >= 1 and loader.stats["samples_substituted"] == len(lost)
    # every other sample exactly once; the lost ones replaced by repeats
    assert len(seen) == loader.samples_per_epoch and len(set(seen)) == len(seen) - len(lost)


def test_resume_is_exact_with_garbage_inside_a_shard(shards):
    for entry in biggest_shards(shards, 3):
        path = shards / entry["name"]
        overwrite_with_garbage(path, path.stat().st_size // 3)
    full = list(loader_for(shards, world_size=1).iterate(0))
    resumed = list(loader_for(shards, world_size=1).iterate(0, 41))
    assert len(resumed) == len(full) - 41
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full[41:], resumed, strict=True) for k in a)


def test_zeroed_blocks_and_a_damaged_first_header(shards):
    """A zeroed region (what a lost page often reads as) is not the archive's end; damage before a shard's
    first sample leaves that shard's rest unread (its samples could not be placed), never misplaced."""
    first, second = biggest_shards(shards, 2)
    keys = keys_by_shard(shards)
    path = shards / first["name"]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 512 * 512
    data[middle : middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    overwrite_with_garbage(shards / second["name"], 0, 600)
    loader = loader_for(shards, world_size=1)
    seen = set(run_epoch(loader))
    used = used_ordinals(loader, 0, first["name"])
    assert {keys[first["name"]][i] for i in used if i > len(keys[first["name"]]) * 3 // 5} <= seen
    assert not seen & set(keys[second["name"]])
    assert loader.stats["read_errors"] >= 2
