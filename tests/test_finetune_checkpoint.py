"""Fine-tuning keeps the checkpoint of its best dev score whatever checkpoint.keep_last says."""

from __future__ import annotations

import json

from pipeline.train.checkpoint import Checkpointer, published_tags


def _publish(directory, step: int, best: bool) -> None:
    tag = directory / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "checkpoint.json").write_text(json.dumps({"step": step, "best": best}))


def test_the_newest_best_checkpoint_outlives_keep_last(tmp_path):
    ckpt = tmp_path / "checkpoints"
    checkpointer = Checkpointer(tmp_path, keep_last=1, rank=0, world_size=1)
    for step, best in ((10, True), (20, True), (30, False), (40, False)):
        _publish(ckpt, step, best)
        checkpointer._prune(keep=f"step_{step:08d}")
    assert [tag for _, tag in published_tags(ckpt)] == ["step_00000020", "step_00000040"]


def test_pretraining_checkpoints_are_pruned_as_before(tmp_path):
    ckpt = tmp_path / "checkpoints"
    checkpointer = Checkpointer(tmp_path, keep_last=2, rank=0, world_size=1)
    for step in (10, 20, 30):
        _publish(ckpt, step, best=False)
        checkpointer._prune(keep=f"step_{step:08d}")
    assert [tag for _, tag in published_tags(ckpt)] == ["step_00000020", "step_00000030"]
