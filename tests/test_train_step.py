"""The training step, run inside the test process: no host sync per micro-batch, NaN steps skipped.

On a GPU every read of a device value on the host (``.item()``, ``bool(t)``, a boolean index whose size only
the device knows) stalls the host until the device has caught up. A CPU run cannot feel that, but it can see
the operators that would: ``HostReads`` records them under a ``TorchDispatchMode``. The host-side facts the
step needs about a batch (real tokens, padding, labelled positions) are read from the loader's host copy as
numpy arrays, which is what they are, and never reach the dispatcher.
"""

from __future__ import annotations

import gzip
import itertools
import json

import pytest
import torch
from train_helpers import HostReads, build_shards, train_in_process

from pipeline.model.loss import IGNORE_INDEX, token_cross_entropy
from pipeline.train.pretrain import PretrainTask


@pytest.fixture(scope="module")
def bert_shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.mktemp("shards") / "bert", small_tokenizer, "bert")


def test_no_host_sync_between_the_micro_batches_of_a_step(bert_shards, tmp_path, process_group):
    """Four micro-batches per step: from the start of micro-batch 1 of a step to the start of its last one,
    forward, backward and DeepSpeed's accumulation must not read a device value on the host."""
    reads = HostReads()

    class MarkedTask(PretrainTask):
        micro = 0

        def forward(self, model, batch):
            reads.mark(self.micro)
            self.micro += 1
            return super().forward(model, batch)

    overrides = {"train.max_steps": 3, "train.micro_batch_size": 4, "train.global_batch_size": 16,
                 "train.log_every": 2, "tracking.enabled": False, "checkpoint.every_steps": 0,
                 "train.loss_curve": False}  # fmt: skip
    with reads:
        result = train_in_process(bert_shards, tmp_path / "run", overrides, process_group, MarkedTask)
    assert result["step"] == 3
    per_micro = reads.between_marks()
    assert sorted(per_micro) == list(range(12))
    inside = {m: ops for m, ops in per_micro.items() if m % 4 != 3}  # not the last micro-batch of its step
    assert all(not ops for ops in inside.values()), {m: ops for m, ops in inside.items() if ops}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss"] > 0 for r in records)
    assert "mlm_acc" in records[1] and "mlm_acc" not in records[0]  # the window's metrics at log steps only


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_loss_at_a_known_number_of_labels_per_row_equals_boolean_gathering(chunk_size):
    """The trainer tells the loss how many labels a row has at most (from the host copy): same loss, accuracy
    and count as finding them on the device, and no operator that waits for the device."""
    torch.manual_seed(0)
    B, T, H, V = 3, 10, 8, 13
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[0, [1, 4, 5]] = torch.tensor([3, 7, 1])
    labels[2, [0, 9]] = torch.tensor([2, 12])  # row 1 has no label at all
    reference = token_cross_entropy(hidden, labels, weight, None, V, chunk_size=chunk_size)
    ref_grads = torch.autograd.grad(reference.loss, (hidden, weight))
    for most in (3, T):
        reads = HostReads()
        with reads:
            got = token_cross_entropy(hidden, labels, weight, None, V, chunk_size=chunk_size, max_labels_per_row=most)
        assert not reads.events, reads.events
        torch.testing.assert_close(got.loss, reference.loss)
        assert int(got.correct) == int(reference.correct) and int(got.count) == int(reference.count) == 5
        for a, b in zip(torch.autograd.grad(got.loss, (hidden, weight)), ref_grads, strict=True):
            torch.testing.assert_close(a, b)


def test_nonfinite_losses_skip_steps_then_stop(bert_shards, tmp_path, process_group):
    """A task whose loss turns NaN: those steps are skipped (weights unchanged), and M in a row stop the run."""

    def nan_task(nan_steps):
        class NanTask(PretrainTask):
            def __init__(self, *args):
                super().__init__(*args)
                self.micro = 0
                self.snapshots: list[torch.Tensor] = []

            def forward(self, model, batch):
                self.micro += 1
                step = (self.micro - 1) // 2 + 1  # two micro-batches per step in the debug preset
                self.snapshots.append(next(model.module.parameters()).detach().clone())
                out = super().forward(model, batch)
                if step in nan_steps:
                    out.loss = out.loss * float("nan")
                return out

        return NanTask

    tasks = []

    def make(nan_steps):
        def factory(*args):
            tasks.append(nan_task(nan_steps)(*args))
            return tasks[-1]

        return factory

    common = {"tracking.enabled": False, "checkpoint.every_steps": 0, "train.loss_curve": False}
    result = train_in_process(bert_shards, tmp_path / "a", {**common, "train.max_steps": 6,
                              "train.max_nonfinite_steps": 5}, process_group, make({3, 4}))  # fmt: skip
    # snapshots[i]: the first weight before micro-batch i; a step's update shows at the next step's first one.
    before_step = {s: tasks[0].snapshots[2 * (s - 1)] for s in range(1, 7)}
    assert all(torch.equal(before_step[s], before_step[s + 1]) for s in (3, 4))
    assert all(not torch.equal(before_step[s], before_step[s + 1]) for s in (1, 2, 5))
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("update_skipped") == "nonfinite_loss"] == [3, 4]
    assert result["skipped_nonfinite"] == 2
    with pytest.raises(RuntimeError, match="3 consecutive steps with a NaN/inf loss"):
        train_in_process(bert_shards, tmp_path / "b", {**common, "train.max_steps": 50,
                         "train.max_nonfinite_steps": 3}, process_group, make(set(range(2, 100))))  # fmt: skip


@pytest.mark.parametrize("phase1_stage", [0, 1])
def test_phase_two_starts_from_the_fp32_masters_of_a_bf16_phase_one(bert_shards, tmp_path, process_group,
                                                                     phase1_stage):  # fmt: skip
    """BERT phase 2 (``train.init_from``) in bf16: DeepSpeed's fp32 masters start as phase 1's fp32 masters,
    bit for bit, not as their bf16 copy (which they were: DeepSpeed built them from the module it cast)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from pipeline.train.checkpoint import consolidate_checkpoint, find_checkpoint

    common = {"train.precision": "bf16", "tracking.enabled": False, "train.loss_curve": False,
              "checkpoint.every_steps": 0}  # fmt: skip
    phase1 = tmp_path / "phase1"
    train_in_process(bert_shards, phase1, {**common, "train.max_steps": 3, "train.zero_stage": phase1_stage,
                     "deepspeed.config": f"configs/deepspeed/zero{phase1_stage}.json"}, process_group)  # fmt: skip
    tag = find_checkpoint("auto", phase1)
    seen, modules = {}, []

    class Phase2(PretrainTask):
        def forward(self, model, batch):
            if not seen:  # before the first update
                modules.append(model.module)
                for name, p in model.module.named_parameters():
                    seen[name] = safe_get_full_fp32_param(p).clone()
            return super().forward(model, batch)

    result = train_in_process(bert_shards, tmp_path / "phase2", {**common, "train.max_steps": 1,
                              "train.init_from": str(phase1)}, process_group, Phase2)  # fmt: skip
    assert result["step"] == 1  # a fresh step count
    masters = consolidate_checkpoint(tag, phase1_stage, modules[0])  # ZeRO 0 in bf16: names its fp32 groups
    trained = {n: masters[n] for n in seen}
    assert any(not torch.equal(t, t.bfloat16().float()) for t in trained.values())  # not bf16-representable
    for name, value in trained.items():
        assert torch.equal(seen[name], value), name


@pytest.fixture(scope="module")
def one_doc_shards(tmp_path_factory, small_tokenizer):
    """BERT shards of one address (415 samples at seq 64): an epoch is 40 micro-batches of 10 on 2 workers."""
    from conftest import DEMO_CORPUS

    import data_shards

    root = tmp_path_factory.mktemp("one-doc")
    corpus = root / "one.jsonl.gz"
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as src, gzip.open(corpus, "wt", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, 1))
    return data_shards.build_shards(root, small_tokenizer, "bert", **{"input.paths": [str(corpus)], "data.seq_len": 64})


@pytest.mark.slow  # ~50 s each: an epoch of 40 steps and two engine starts; the loader tests cover the maths
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_training_continues_an_epoch_on_more_loader_slots(one_doc_shards, tmp_path, process_group, where):
    """A run checkpointed with 2 loader workers resumes with 3 (other slots, as on another world size): it
    never raises at the epoch's end (the old position, 40 batches, exceeded the new epoch's 39) and the epoch's
    samples are each seen once across the two runs (only the rest's remainder, < 3 x 10, is left out)."""
    from pipeline.data import DataConfig, PretrainLoader

    seen: list[tuple[int, list[str]]] = []

    class Recording(PretrainTask):
        def batches(self, epoch, start_batch, history=()):
            self.loader.with_keys = True
            for batch in super().batches(epoch, start_batch, history):
                seen.append((epoch, self.loader.last_keys))
                yield batch

    def loader(workers):
        cfg = DataConfig(shards=str(one_doc_shards), num_workers=workers, shuffle_window=1000)
        return PretrainLoader(cfg, micro_batch_size=10, seed=1234, with_keys=True)

    first, second = loader(2), loader(3)
    assert first.batches_per_epoch == 40 > second.batches_per_epoch == 39  # the edge of the issue
    epoch0 = {k for _ in first.iterate(0) for k in first.last_keys}
    out = tmp_path / "run"
    common = {"train.micro_batch_size": 10, "train.global_batch_size": 10, "tracking.enabled": False,
              "train.loss_curve": False, "checkpoint.every_steps": 0, "model.hidden_dropout": 0.0}  # fmt: skip
    stop = 40 if where == "epoch_end" else 16
    train_in_process(one_doc_shards, out, {**common, "train.max_steps": stop, "data.num_workers": 2},
                     process_group, Recording)  # fmt: skip
    rest = second.batches_in_epoch(0, [{**first.layout(), "batches": stop}])
    result = train_in_process(one_doc_shards, out, {**common, "train.max_steps": stop + rest + 2,
                              "data.num_workers": 3}, process_group, Recording)  # fmt: skip
    assert result["step"] == stop + rest + 2 and result["epoch"] == 1
    assert result["samples"] == 10 * (stop + rest + 2)
    keys = [k for epoch, batch in seen if epoch == 0 for k in batch]
    assert len(keys) == len(set(keys)) and set(keys) <= epoch0
    assert len(epoch0) - len(keys) < 3 * 10
    if where == "epoch_end":
        assert rest == 0 and len(keys) == len(epoch0)
    assert [epoch for epoch, _ in seen].count(1) == 2
