"""Multi-node training without SLURM: two torchrun "nodes" (launch/torchrun.sh, node ranks 0 and 1) on loopback.

ZeRO-2 across the two nodes computes what one process with the same samples per step computes; a rank killed
mid-run is restarted by torchrun (--max-restarts) and both nodes resume from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from train_helpers import RESUME_RTOL, build_shards, losses, start_train, train_args

pytestmark = pytest.mark.slow

ZERO2 = [
    "--model.hidden_dropout", "0", "--model.attention_dropout", "0", "--train.zero_stage", "2",
    "--deepspeed.config", "configs/deepspeed/zero2.json", "--train.micro_batch_size", "8",
    "--train.global_batch_size", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.mktemp("multinode") / "bert", small_tokenizer, "bert")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(args: list[str], tmp: Path, *options: str) -> list[subprocess.Popen]:
    """Both nodes of a 2-node job, one rank each, rendezvous on 127.0.0.1."""
    port = free_port()
    env = {**os.environ, "PYTHON": sys.executable, "PIPELINE_PROGRESS": "0"}
    procs = []
    for rank in (0, 1):
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), "--nnodes", "2", "--node-rank", str(rank),
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--nproc-per-node", "1", "--rdzv-id", "test",
               "--log-dir", str(tmp / "logs"), *options, *args]  # fmt: skip
        log = open(tmp / f"node{rank}.log", "w")  # noqa: SIM115 - handed to the child
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # fmt: skip
    return procs


def wait_all(procs: list[subprocess.Popen], tmp: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    try:
        for rank, proc in enumerate(procs):
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            assert rc == 0, f"node {rank} exited {rc}:\n" + (tmp / f"node{rank}.log").read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_two_nodes_on_loopback_train_with_zero2(shards, tmp_path):
    two = tmp_path / "two-nodes"
    wait_all(start_nodes(train_args(shards, two, *ZERO2, "--train.max_steps", "6", "--data.num_workers", "1"),
                         tmp_path), tmp_path)  # fmt: skip
    one = tmp_path / "one-process"
    proc = start_train(train_args(shards, one, *ZERO2, "--train.max_steps", "6", "--data.num_workers", "2"),
                       tmp_path / "one.log")  # fmt: skip
    assert proc.wait(timeout=600) == 0, (tmp_path / "one.log").read_text()[-4000:]
    mark = json.loads((two / "checkpoints" / "step_00000006" / "checkpoint.json").read_text())
    assert mark["world_size"] == 2 and mark["zero_stage"] == 2
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        mark["files"]
    )
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(1, 7))
    for step in a:  # the same samples per step: the same losses up to float reduction order
        assert b[step] == pytest.approx(a[step], rel=2e-4), (step, a[step], b[step])


def worker_pids(agent_pid: int) -> list[int]:
    """The ranks torchrun started: its children running `-m pipeline`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == agent_pid and b"pipeline" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_killed_rank_is_restarted_and_resumes_from_the_last_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    args = train_args(shards, out, *ZERO2, "--train.max_steps", "24", "--checkpoint.every_steps", "5",
                      "--train.log_every", "1", "--tracking.system_metrics", "false")  # fmt: skip
    procs = start_nodes(args, tmp_path, "--max-restarts", "1")
    try:
        deadline = time.time() + 600
        # Kill node 1's rank after the step-10 checkpoint is published and training went on past it.
        while not ((out / "checkpoints" / "step_00000010" / "checkpoint.json").exists() and max(losses(out)) >= 12):
            assert all(p.poll() is None for p in procs), "a node ended before the kill"
            assert time.time() < deadline, "training did not reach step 12"
            time.sleep(0.1)
        killed_after = max(losses(out))
        assert killed_after < 24, "the run ended before the kill: make it longer"
        victims = worker_pids(procs[1].pid)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        # The steps taken before the kill, read before the restarted ranks (seconds away: a new interpreter,
        # DeepSpeed, the checkpoint) drop those after step 10 from metrics.jsonl to take them again. Rank 0
        # cannot finish another step without its dead peer.
        time.sleep(0.5)
        first = losses(out)
    except BaseException:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    wait_all(procs, tmp_path)

    logs = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert "resumed from" in logs and "step_00000010" in logs
    assert list((tmp_path / "logs" / "node1").glob("*/attempt_1")), "torchrun did not restart node 1's workers"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Steps 11..k ran twice (before the kill and after the resume from step 10), to the same losses (up to a
    # few float32 ulps of run-to-run noise: train_helpers.RESUME_RTOL); metrics.jsonl holds each step once.
    assert list(first) == list(range(1, len(first) + 1)) and len(first) >= killed_after
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:
        if r["step"] in first:
            assert r["loss"] == pytest.approx(first[r["step"]], rel=RESUME_RTOL), (r["step"], r["loss"])
    assert (out / "checkpoints" / "step_00000024" / "checkpoint.json").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert logged == list(range(1, 25))  # each step once, although steps 11..k were taken twice


def test_a_user_error_is_not_restarted(shards, tmp_path):
    """A missing DeepSpeed config (a path on the command line: the working directory's) is the same error at every
    attempt: one attempt, exit status 2, the message once, however many restarts torchrun is allowed."""
    env = {**os.environ, "PYTHON": sys.executable, "PIPELINE_PROGRESS": "0"}
    cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), "--nproc-per-node", "2", "--max-restarts", "3",
           "--log-dir", str(tmp_path / "logs"), "train", str(REPO / "configs" / "pretrain" / "debug.yaml"),
           "--data.shards", str(shards), "--train.output_dir", "run", "--deepspeed.config", "missing.json",
           "--data.num_workers", "0", "--tracking.enabled", "false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-4000:]
    assert text.count(f"deepspeed.config: {tmp_path / 'missing.json'} not found") == 1, text[-4000:]
    assert "exited with status 2 (an error to fix, shown above): not restarted" in text
    attempts = sorted(p.name for p in (tmp_path / "logs" / "node0").glob("*/attempt_*"))
    assert attempts == ["attempt_0"], attempts
