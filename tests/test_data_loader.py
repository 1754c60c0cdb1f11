"""The pre-training loader on real shards: partition over ranks and workers, equal counts, resume, epochs,
batch formats, static masks, the tokenizer check and the config."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import webdataset as wds

from data_shards import build_shards, copy_shards, keys_by_shard, manifest
from pipeline.config import ConfigError, build_config
from pipeline.data import DataConfig, PretrainLoader
from pipeline.data.masking import IGNORE_INDEX
from pipeline.errors import UserError
from pipeline.preprocess.samples import GPT_FIELD, npy_load, parse_bert
from pipeline.tokenizer.special import SPECIAL_IDS


@pytest.fixture(scope="session")
def bert_shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.getbasetemp() / "data", small_tokenizer, "bert")


@pytest.fixture(scope="session")
def gpt_shards(tmp_path_factory, small_tokenizer):
    return build_shards(
        tmp_path_factory.getbasetemp() / "data", small_tokenizer, "gpt", **{"data.objective": "gpt", "data.seq_len": 64}
    )


@pytest.fixture(scope="session")
def static_shards(tmp_path_factory, small_tokenizer):
    return build_shards(
        tmp_path_factory.getbasetemp() / "data", small_tokenizer, "static", **{"data.static_masking": True}
    )


def make_loader(shards, micro_batch_size=16, rank=0, world_size=1, seed=7, with_keys=True, **cfg):
    cfg = {"num_workers": 2, "shuffle_window": 300, **cfg}
    return PretrainLoader(
        DataConfig(shards=str(shards), **cfg),
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        with_keys=with_keys,
    )


def epoch_keys(loader, epoch, start_batch=0) -> list[list[str]]:
    batches = []
    for _ in loader.iterate(epoch, start_batch):
        batches.append(loader.last_keys)
    return batches


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for name in x:
            assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(bert_shards):
    by_shard = keys_by_shard(bert_shards)
    sizes = [len(k) for k in by_shard.values()]
    assert len(set(sizes)) > 5  # uneven shards: whole-shard splitting would give ranks unequal counts
    all_keys = [k for keys in by_shard.values() for k in keys]
    loaders = [make_loader(bert_shards, rank=r, world_size=2) for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch
    dropped_by_epoch = []
    for epoch in range(2):
        per_rank = [epoch_keys(ld, epoch) for ld in loaders]
        assert [len(b) for b in per_rank] == [loaders[0].batches_per_epoch] * 2  # equal batch counts
        assert all(len(batch) == 16 for batches in per_rank for batch in batches)
        seen = [k for batches in per_rank for batch in batches for k in batch]
        assert len(seen) == len(set(seen)) == loaders[0].samples_per_epoch  # exactly once
        dropped = set(all_keys) - set(seen)
        assert len(dropped) == loaders[0].samples_dropped_per_epoch < 2 * 2 * 16
        # The samples left out are the tail of this epoch's shard order, as the plan says.
        plan = loaders[0].plan(epoch)
        names = [s.name for s in loaders[0].shard_set.shards]
        expected = {by_shard[names[s]][i] for s, i in map(plan.locate, range(plan.samples_used, plan.num_samples))}
        assert dropped == expected
        dropped_by_epoch.append(dropped)
    assert dropped_by_epoch[0] != dropped_by_epoch[1]  # the shard order changes, so do the samples left out


def test_order_differs_between_epochs_and_seeds_but_is_reproducible(bert_shards):
    loader = make_loader(bert_shards, num_workers=1)
    first, second = epoch_keys(loader, 0), epoch_keys(loader, 1)
    assert first != second and sorted(map(tuple, first)) != sorted(map(tuple, second))
    assert epoch_keys(make_loader(bert_shards, num_workers=1), 1) == second
    assert epoch_keys(make_loader(bert_shards, num_workers=1, seed=8), 1) != second


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_resume_mid_epoch_is_bitwise_identical(bert_shards, world_size, rank):
    # Small windows so that resume points fall inside windows, on window edges and at odd worker phases.
    loader = make_loader(bert_shards, micro_batch_size=8, world_size=world_size, rank=rank, shuffle_window=100)
    full = list(loader.iterate(0))
    assert len(full) == loader.batches_per_epoch
    for start in (1, 25, 26, len(full) - 3):
        resumed = list(make_loader(bert_shards, 8, rank, world_size, shuffle_window=100).iterate(0, start))
        assert_same_batches(resumed, full[start:])


def test_state_dict_round_trip_continues_the_stream(bert_shards):
    loader = make_loader(bert_shards, micro_batch_size=8, shuffle_window=100)
    reference = list(
        itertools.islice(iter(make_loader(bert_shards, 8, shuffle_window=100)), loader.batches_per_epoch + 5)
    )
    taken = list(itertools.islice(iter(loader), 37))
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores: plain JSON
    assert state["epoch"] == 0 and state["batch"] == 37
    resumed = make_loader(bert_shards, micro_batch_size=8, shuffle_window=100)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(iter(resumed), len(reference) - 37))  # crosses into epoch 1
    assert_same_batches(taken + rest, reference)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batch"] == 5
    # A position saved at an epoch's end continues with the next epoch.
    end = {**state, "batch": loader.batches_per_epoch}
    resumed.load_state_dict(end)
    assert (resumed.epoch, resumed.state_dict()["batch"]) == (1, 0)


def test_state_from_another_layout_is_refused(bert_shards):
    state = make_loader(bert_shards, micro_batch_size=8).state_dict()
    state["batch"] = 3
    other = make_loader(bert_shards, micro_batch_size=16)
    with pytest.raises(UserError, match="micro_batch_size 8 -> 16"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.state_dict()["batch"] == 0


def test_bert_batch_format(bert_shards):
    loader = make_loader(bert_shards, num_workers=0)
    batch = next(iter(loader.iterate(0)))
    B, T = 16, 128
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (B, T), "token_type_ids": (B, T), "attention_mask": (B, T), "mlm_labels": (B, T),
        "nsp_labels": (B,),
    }  # fmt: skip
    assert all(v.dtype == torch.int64 for v in batch.values())
    ids, types, mask, labels = (
        batch[k].numpy() for k in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels")
    )
    original = np.where(labels != IGNORE_INDEX, labels, ids)
    assert (original[:, 0] == SPECIAL_IDS.cls).all() and set(batch["nsp_labels"].tolist()) <= {0, 1}
    for row in range(B):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any() and (ids[row, n:] == SPECIAL_IDS.pad).all()
        seps = np.flatnonzero(original[row, :n] == SPECIAL_IDS.sep)
        assert len(seps) == 2 and seps[1] == n - 1
        assert (types[row, : seps[0] + 1] == 0).all() and (types[row, seps[0] + 1 : n] == 1).all()
        assert not types[row, n:].any() and (labels[row, n:] == IGNORE_INDEX).all()
    predicted = labels != IGNORE_INDEX
    assert predicted.sum(1).min() > 0 and predicted.sum(1).max() <= 20
    # pad_to=batch: the longest sample rounded up to a multiple of 8
    batch = next(iter(make_loader(bert_shards, num_workers=0, pad_to="batch").iterate(0)))
    longest = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape[1] == min(128, -(-longest // 8) * 8)


def test_gpt_batches_shift_inputs_and_targets_by_one(gpt_shards):
    loader = make_loader(gpt_shards, micro_batch_size=32)
    assert loader.objective == "gpt" and loader.tokens_per_batch == 32 * 64
    blocks = {}
    for entry in manifest(gpt_shards)["shards"]:
        for s in wds.WebDataset(str(gpt_shards / entry["name"]), shardshuffle=False, nodesplitter=None):
            blocks[s["__key__"]] = npy_load(s[GPT_FIELD]).astype(np.int64)
    count = 0
    for batch in loader.iterate(0):
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        assert batch["input_ids"].shape == batch["labels"].shape == (32, 64) and bool(batch["attention_mask"].all())
        for row, key in enumerate(loader.last_keys):
            assert np.array_equal(batch["input_ids"][row].numpy(), blocks[key][:-1])
            assert np.array_equal(batch["labels"][row].numpy(), blocks[key][1:])
        count += 1
    assert count == loader.batches_per_epoch


def test_static_masks_from_the_shards_are_used(static_shards):
    records = {}
    for entry in manifest(static_shards)["shards"]:
        for s in wds.WebDataset(str(static_shards / entry["name"]), shardshuffle=False, nodesplitter=None):
            records[s["__key__"]] = parse_bert(s, SPECIAL_IDS.sep)
    loader = make_loader(static_shards, num_workers=0)
    for epoch in range(2):  # the same masks every epoch: they are the shards'
        batch = next(iter(loader.iterate(epoch)))
        for row, key in enumerate(loader.last_keys):
            rec = records[key]
            n = len(rec["input_ids"])
            assert np.array_equal(batch["input_ids"][row, :n].numpy(), rec["input_ids"])
            labels = batch["mlm_labels"][row].numpy()
            assert np.array_equal(np.flatnonzero(labels != IGNORE_INDEX), rec["masked_positions"])
            assert np.array_equal(labels[rec["masked_positions"]], rec["masked_labels"])


def test_per_epoch_facts(bert_shards):
    loader = make_loader(bert_shards, micro_batch_size=16, world_size=2)
    total = manifest(bert_shards)["totals"]["samples"]
    assert loader.samples_per_epoch == loader.batches_per_epoch * 16 * 2
    assert loader.samples_per_epoch + loader.samples_dropped_per_epoch == total
    assert loader.tokens_per_batch == 16 * 128 and 0 < loader.mean_real_tokens_per_batch <= 16 * 128
    facts = loader.describe()
    assert facts["batches_per_epoch"] == loader.batches_per_epoch and facts["shards_excluded"] == []


def test_too_little_data_for_one_batch_per_reader_is_a_clear_error(bert_shards):
    with pytest.raises(UserError, match="fewer than one batch per reader"):
        make_loader(bert_shards, micro_batch_size=4096, world_size=2)


def test_tokenizer_must_match_the_manifest(bert_shards, small_tokenizer, tmp_path):
    loader = PretrainLoader(DataConfig(shards=str(bert_shards)), micro_batch_size=8, tokenizer=small_tokenizer)
    assert loader.tokenizer.sha256 == manifest(bert_shards)["tokenizer"]["sha256"]
    # Shards written with another tokenizer (here: a manifest that says so).
    other = copy_shards(bert_shards, tmp_path / "other")
    m = manifest(other)
    m["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"is not the one the shards .* were written with \(sha256 000000000000"):
        PretrainLoader(DataConfig(shards=str(other)), micro_batch_size=8, tokenizer=small_tokenizer)


def test_config_validation_names_the_field():
    cfg = build_config(DataConfig, None, {"shards": "x", "mask_prob": "0.2", "pad_to": "batch"})
    assert cfg.mask_prob == 0.2 and cfg.pad_to == "batch"
    for field, value in [
        ("mask_prob", "0"),
        ("num_workers", "-1"),
        ("shuffle_window", "0"),
        ("max_predictions_per_seq", "0"),
    ]:
        with pytest.raises(ConfigError, match=f"data.{field}"):
            build_config(DataConfig, None, {field: value})
    with pytest.raises(ConfigError, match="data.random_replace_prob"):
        build_config(DataConfig, None, {"mask_replace_prob": "0.9", "random_replace_prob": "0.2"})
    with pytest.raises(ConfigError, match="pad_to"):
        build_config(DataConfig, None, {"pad_to": "longest"})
    with pytest.raises(UserError, match="data.shards"):
        PretrainLoader(DataConfig(), micro_batch_size=8)


def test_masks_differ_between_epochs_for_the_same_sample(bert_shards):
    loader = make_loader(bert_shards, num_workers=0)
    labels_by_key = [{}, {}]
    for epoch in range(2):
        for batch in loader.iterate(epoch):
            for row, key in enumerate(loader.last_keys):
                labels_by_key[epoch][key] = tuple(np.flatnonzero(batch["mlm_labels"][row].numpy() != IGNORE_INDEX))
    common = set(labels_by_key[0]) & set(labels_by_key[1])
    assert common and sum(labels_by_key[0][k] != labels_by_key[1][k] for k in common) > 0.9 * len(common)


def test_whole_word_masking_through_the_loader(bert_shards, small_tokenizer):
    for tokenizer in (small_tokenizer, None):  # None: the manifest's tokenizer path is used
        loader = PretrainLoader(
            DataConfig(shards=str(bert_shards), num_workers=0, whole_word_mask=True),
            micro_batch_size=32,
            tokenizer=tokenizer,
        )
        batch = next(iter(loader.iterate(0)))
        counts = (batch["mlm_labels"] != IGNORE_INDEX).sum(1)
        assert counts.min() > 0 and counts.max() <= 20


def test_worker_side_is_picklable_for_spawn_start_methods(bert_shards):
    # Python 3.14 starts DataLoader workers with forkserver, which pickles the dataset.
    import pickle

    from pipeline.data.dataset import RankEpoch

    dataset = RankEpoch(make_loader(bert_shards, num_workers=0, whole_word_mask=True).epoch_spec(1, 3))
    clone = pickle.loads(pickle.dumps(dataset))
    first, again = next(iter(clone))[0], next(iter(dataset))[0]
    assert all(torch.equal(first[k], again[k]) for k in first)


def keys_of(loader, epoch, start_batch=0, history=(), count=None) -> list[list[str]]:
    """The sample keys of the batches ``loader.iterate`` hands out (the first ``count`` of them)."""
    out = []
    batches = loader.iterate(epoch, start_batch, history)
    for _ in itertools.islice(batches, count):
        out.append(loader.last_keys)
    batches.close()  # stops its workers
    return out


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_an_epoch_continues_on_another_layout_with_every_sample_once(bert_shards, where):
    """2 ranks x 1 worker -> 1 rank x 3 workers, micro-batch 10 (the resume of a universal checkpoint): the
    rest of the epoch is what the old slots had not read, each sample once; at the epoch's end there is no
    rest, where the old position (samples // new micro-batch) pointed past the new epoch's end and raised."""
    old = [make_loader(bert_shards, micro_batch_size=10, rank=r, world_size=2, num_workers=1) for r in range(2)]
    per_rank = old[0].batches_per_epoch
    consumed = per_rank if where == "epoch_end" else per_rank // 3
    epoch = [k for ld in old for batch in keys_of(ld, 0) for k in batch]  # the old layout's whole epoch
    before = [k for ld in old for batch in keys_of(ld, 0, count=consumed) for k in batch]
    new = make_loader(bert_shards, micro_batch_size=10, num_workers=3)
    history = [{**old[0].layout(), "batches": consumed}]
    after = [k for batch in keys_of(new, 0, history=history) for k in batch]
    seen = before + after
    assert len(seen) == len(set(seen)) and set(seen) <= set(epoch)  # nothing twice, nothing foreign
    left_out = new.plan(0, new.check_history(history)).samples_dropped
    assert len(epoch) - len(seen) == left_out < 3 * 10  # only the rest's remainder, as in any epoch
    if where == "epoch_end":
        assert after == [] and new.batches_in_epoch(0, history) == 0
        assert consumed * 2 * 10 // 10 > new.batches_per_epoch  # the old position would have overrun
    else:
        assert len(after) == 10 * new.batches_in_epoch(0, history) > 0
        # Resuming inside the rest on the same new layout continues its stream exactly.
        assert keys_of(new, 0, start_batch=5, history=history) == keys_of(new, 0, history=history)[5:]


def test_an_epoch_moved_to_the_same_slots_on_fewer_ranks_gives_the_same_batches(bert_shards):
    """2 ranks x 1 worker -> 1 rank x 2 workers: the same slots, so the same batches, masks included."""
    old = [make_loader(bert_shards, micro_batch_size=8, rank=r, world_size=2, num_workers=1) for r in range(2)]
    consumed = 7
    rest_old = [list(itertools.islice(ld.iterate(0, consumed), 4)) for ld in old]
    new = make_loader(bert_shards, micro_batch_size=8, num_workers=2)
    rest_new = list(itertools.islice(new.iterate(0, 0, [{**old[0].layout(), "batches": consumed}]), 8))
    assert_same_batches(rest_new, [rest_old[j % 2][j // 2] for j in range(8)])


def test_an_epoch_cannot_continue_on_another_data_order(bert_shards):
    loader = make_loader(bert_shards, micro_batch_size=10, num_workers=1)
    history = [{**loader.layout(), "seed": 99, "batches": 3}]
    with pytest.raises(UserError, match="another data order"):
        loader.batches_in_epoch(0, history)
