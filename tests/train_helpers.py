"""Shared helpers for the training tests: demo shards built once, and `pipeline train` as a subprocess or
inside the test process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from conftest import DEMO_CORPUS, REPO, run_cli
from torch.utils._python_dispatch import TorchDispatchMode


def build_shards(out: Path, tokenizer: Path, objective: str, seq_len: int = 64) -> Path:
    run_cli("shard", "--input", str(DEMO_CORPUS), "--tokenizer", str(tokenizer), "--output", str(out),
            "--objective", objective, "--seq-len", str(seq_len), "--data.unit_bytes", str(512 * 1024))  # fmt: skip
    return out


def train_args(shards: Path, out: Path, *extra: str, config: str = "configs/pretrain/debug.yaml") -> list[str]:
    return ["train", "--config", config, "--data.shards", str(shards), "--train.output_dir", str(out), *extra]


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss; for a step logged twice (before a crash and after the resume) the last one wins."""
    out = {}
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


# Two uninterrupted runs of the same preset can differ in the last bit of a float32 loss: CI saw one such
# run-to-run difference (7.72745347 vs 7.72745395 at step 8, before any kill) between a run inside the test
# process and the same run in a subprocess. A resume that lost anything (optimizer moments, the data position,
# the dropout or masking streams, the schedule) moves the next losses by 1e-3 or more, so a relative tolerance
# of 1e-6 (a few float32 ulps) keeps the check exact in every sense that matters and immune to that noise.
RESUME_RTOL = 1e-6


def assert_same_losses(got: dict[int, float], ref: dict[int, float]) -> None:
    """The same steps, each loss equal up to a few float32 ulps (``RESUME_RTOL``)."""
    assert list(got) == list(ref), (sorted(got), sorted(ref))
    far = {s: (got[s], ref[s]) for s in ref if abs(got[s] - ref[s]) > RESUME_RTOL * abs(ref[s])}
    assert not far, f"losses differ beyond {RESUME_RTOL:g} relative at steps {far}"


def start_train(args: list[str], log: Path, env: dict | None = None, torchrun: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline", *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}",
               "-m", "pipeline", *args]  # fmt: skip
    full_env = {**os.environ, "PIPELINE_PROGRESS": "0", **(env or {})}
    fh = open(log, "w")  # noqa: SIM115 - handed to the child, closed with it
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def train_in_process(shards: Path, out: Path, overrides: dict, dist_info, task_factory=None,
                     config: str = "configs/pretrain/debug.yaml") -> dict:  # fmt: skip
    """``pipeline train`` inside the test process (no interpreter, import or process-group start-up;
    ``dist_info`` is the ``process_group`` fixture):
    the config with ``overrides`` (``{"train.max_steps": 4}``), a ``PretrainTask`` (or
    ``task_factory(model_cfg, loader, shard_set, device)``), and the loop's result."""
    import torch

    from pipeline.config import build_config
    from pipeline.data.loader import PretrainLoader
    from pipeline.data.shards import open_shard_set
    from pipeline.train.config import TrainJobConfig
    from pipeline.train.loop import run_training
    from pipeline.train.pretrain import PretrainTask, model_config_for_shards

    cfg = build_config(TrainJobConfig, str(REPO / config),
                       {"data.shards": str(shards), "train.output_dir": str(out), **overrides})  # fmt: skip
    shard_set = open_shard_set(cfg.data.shards)
    cfg.model = model_config_for_shards(cfg.model, shard_set)
    loader = PretrainLoader(cfg.data, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                            shard_set=shard_set)  # fmt: skip
    task = (task_factory or PretrainTask)(cfg.model, loader, shard_set, torch.device("cpu"))
    ds_json = cfg.deepspeed.config
    ds_json = ds_json if Path(ds_json).is_absolute() else str(REPO / ds_json)
    with mock.patch.dict(os.environ, dist_info.env):  # DeepSpeed reads LOCAL_RANK and friends from there
        return run_training(task, dist_info, train=cfg.train, optim=cfg.optim, schedule=cfg.schedule,
                            checkpoint=cfg.checkpoint, tracking=cfg.tracking, deepspeed_json=ds_json,
                            full_config=cfg)  # fmt: skip


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
