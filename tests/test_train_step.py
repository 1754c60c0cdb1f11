"""The training step, run inside the test process: no host sync per micro-batch, NaN steps skipped.

On a GPU every read of a device value on the host (``.item()``, ``bool(t)``, a boolean index whose size only
the device knows) stalls the host until the device has caught up. A CPU run cannot feel that, but it can see
the operators that would: ``HostReads`` records them under a ``TorchDispatchMode``. The host-side facts the
step needs about a batch (real tokens, padding, labelled positions) are read from the loader's host copy as
numpy arrays, which is what they are, and never reach the dispatcher.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import build_shards, train_in_process

from pipeline.model.loss import IGNORE_INDEX, token_cross_entropy
from pipeline.train.pretrain import PretrainTask

aten = torch.ops.aten
# Operators that make the host wait for the device on a GPU: a scalar read, or an output whose size is data.
HOST_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class HostReads(TorchDispatchMode):
    """Records every operator that would wait for the device, and markers the test places between them."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if func in HOST_SYNC_OPS or bool_index:
            self.events.append(("sync", str(func)))
        return func(*args, **kwargs)

    def mark(self, what) -> None:
        self.events.append(("mark", what))

    def between_marks(self) -> dict[object, list[str]]:
        """Sync operators after each mark, up to the next mark."""
        out: dict[object, list[str]] = {}
        current = None
        for kind, what in self.events:
            if kind == "mark":
                current = what
                out[current] = []
            elif current is not None:
                out[current].append(what)
        return out


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
