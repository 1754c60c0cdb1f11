"""Shared helpers for the training tests: demo shards built once, and `pipeline train` as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import DEMO_CORPUS, REPO, run_cli


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
