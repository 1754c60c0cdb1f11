"""Runs the real training loop with a task whose loss is NaN on chosen steps (tests/test_train.py).

Steps 3 and 4 get a NaN loss: they must be skipped with the weights unchanged. A second run with NaN from
step 2 on must stop after train.max_nonfinite_steps consecutive NaN steps with a clear error.
"""

from __future__ import annotations

import json
import sys

import torch

from pipeline.config import build_config
from pipeline.data.loader import PretrainLoader
from pipeline.data.shards import open_shard_set
from pipeline.train.config import TrainJobConfig
from pipeline.train.engine import init_distributed
from pipeline.train.loop import run_training
from pipeline.train.pretrain import PretrainTask, model_config_for_shards


class NanTask(PretrainTask):
    def __init__(self, *args, nan_steps, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_steps = nan_steps
        self.micro = 0
        self.snapshots: list[torch.Tensor] = []
        self.model = None

    def forward(self, model, batch):
        self.micro += 1
        step = (self.micro - 1) // 2 + 1  # two micro-batches per step in the debug preset
        self.snapshots.append(next(model.module.parameters()).detach().clone())
        out = super().forward(model, batch)
        if step in self.nan_steps:
            out.loss = out.loss * float("nan")
        return out


def run(shards: str, out: str, nan_steps, max_steps: int, max_nonfinite: int):
    cfg = build_config(TrainJobConfig, "configs/pretrain/debug.yaml", {
        "data.shards": shards, "train.output_dir": out, "train.max_steps": max_steps, "tracking.enabled": False,
        "train.max_nonfinite_steps": max_nonfinite, "checkpoint.every_steps": 0,
    })  # fmt: skip
    shard_set = open_shard_set(cfg.data.shards)
    cfg.model = model_config_for_shards(cfg.model, shard_set)
    loader = PretrainLoader(cfg.data, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                            shard_set=shard_set)  # fmt: skip
    task = NanTask(cfg.model, loader, shard_set, torch.device("cpu"), nan_steps=nan_steps)
    result = run_training(task, INFO, train=cfg.train, optim=cfg.optim, schedule=cfg.schedule,
                          checkpoint=cfg.checkpoint, tracking=cfg.tracking, deepspeed_json=cfg.deepspeed.config,
                          full_config=cfg)  # fmt: skip
    return task, result


INFO = init_distributed()
shards, out = sys.argv[1], sys.argv[2]
task, result = run(shards, out + "/a", {3, 4}, 6, 5)
# snapshots[i] is the first weight before micro-batch i; a step's update shows at the next step's first micro-batch.
before_step = {s: task.snapshots[2 * (s - 1)] for s in range(1, 7)}
unchanged = all(torch.equal(before_step[s], before_step[s + 1]) for s in (3, 4))
changed = all(not torch.equal(before_step[s], before_step[s + 1]) for s in (1, 2, 5))
with open(out + "/a/metrics.jsonl", encoding="utf-8") as fh:
    records = [json.loads(line) for line in fh]
skipped = [r["step"] for r in records if r.get("update_skipped") == "nonfinite_loss"]
try:
    run(shards, out + "/b", set(range(2, 100)), 50, 3)
    stop_error = ""
except RuntimeError as exc:
    stop_error = str(exc)
print(
    json.dumps(
        {
            "skipped_steps": skipped,
            "skipped_nonfinite": result["skipped_nonfinite"],
            "unchanged_when_skipped": unchanged,
            "changed_otherwise": changed,
            "stop_error": stop_error,
        }
    )
)
