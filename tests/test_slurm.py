"""The sbatch scripts, submitted for real to a SLURM cluster on this machine.

The session fixture uses the cluster that answers `sinfo`, or (as root, with apt-get) installs and starts one with
launch/local_slurm/start.sh; otherwise these tests are skipped. They check that the preprocessing array job and
its dependent merge write the same shards as the single command, and that a pre-training job signalled with
SIGUSR1 mid-run checkpoints, requeues itself, resumes and finishes as one MLflow run with every step once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_CORPUS, REPO, run_cli
from train_helpers import build_shards, losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def node_state() -> str:
    """The first node's state as sinfo names it (idle, mixed, allocated, completing, ...); "" if none answers."""
    if shutil.which("sinfo") is None:
        return ""
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    lines = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
    return lines[0] if lines else ""


def cluster_answers() -> bool:
    return re.match(r"(idle|mixed|allocated|completing)", node_state()) is not None


@pytest.fixture(scope="session")
def slurm_cluster() -> int:
    """A SLURM cluster that accepts jobs; returns the CPUs of its first node."""
    if not cluster_answers():
        if os.geteuid() != 0:
            pytest.skip("no SLURM cluster answers `sinfo`, and only root can start launch/local_slurm/start.sh")
        if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
            pytest.skip("no SLURM cluster answers `sinfo`, and there is no apt-get to install slurm-wlm")
        proc = subprocess.run(["bash", str(REPO / "launch" / "local_slurm" / "start.sh")], capture_output=True,
                              text=True, timeout=1200)  # fmt: skip
        assert proc.returncode == 0, f"launch/local_slurm/start.sh failed:\n{proc.stdout}\n{proc.stderr}"
    cpus = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, check=True)
    return int(cpus.stdout.split()[0])


def job_env(tmp: Path) -> dict:
    """The jobs run this checkout with this interpreter and log under the test's directory."""
    return {**os.environ, "PYTHON": sys.executable, "PIPELINE_PROGRESS": "0", "LOG_DIR": str(tmp / "logs")}


def job_info(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def wait_job(job_id: str, log: Path, timeout: float = 900) -> dict[str, str]:
    """Poll until the job has ended; its final scontrol record."""
    deadline = time.time() + timeout
    while True:
        info = job_info(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if time.time() > deadline:
            subprocess.run(["scancel", job_id])
            raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s:\n{tail(log)}")
        time.sleep(1)


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} does not exist)"


def test_preprocessing_array_job_writes_the_same_shards_as_one_command(slurm_cluster, small_tokenizer, tmp_path):
    """Submitted from a directory outside the repository that has no logs/ (preprocess.sh creates it); the task
    that runs under the array's own job id finds the repository too (scontrol then lists every task)."""
    args = ["--tokenizer", str(small_tokenizer), "--input", str(DEMO_CORPUS), "--seq-len", "64",
            "--data.unit_bytes", str(512 * 1024)]  # fmt: skip
    single = tmp_path / "single"
    run_cli("shard", "--config", "configs/preprocess/demo-bert.yaml", *args, "--output", str(single))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**job_env(tmp_path), "NUM_TASKS": "3", "CPUS_PER_TASK": "1"}
    env.pop("LOG_DIR")  # the default, logs/ of the directory submitted from: not there yet
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "preprocess.sh"),
                           str(REPO / "configs" / "preprocess" / "demo-bert.yaml"), *args, "--output", "array"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    arrayed = elsewhere / "array"  # --output: relative to the directory submitted from
    array_id, merge_id = re.search(r"array job (\d+) \(3 tasks\) and merge job (\d+)", proc.stdout).groups()
    logs = elsewhere / "logs"
    info = wait_job(merge_id, logs / f"merge-{merge_id}.out", timeout=900)
    assert info["JobState"] == "COMPLETED", tail(logs / f"merge-{merge_id}.out")
    for task in range(3):
        text = (logs / f"shard-{array_id}_{task}.out").read_text()
        assert f"task {task + 1}/3" in text and "cannot find the repository" not in text, text
    assert "merged" in (logs / f"merge-{merge_id}.out").read_text()

    names = sorted(p.name for p in single.iterdir() if p.is_file())
    assert "manifest.json" in names and sum(n.endswith(".tar") for n in names) >= 3
    for name in names:
        if name.endswith(".tar") or name == "manifest.json":
            assert (arrayed / name).read_bytes() == (single / name).read_bytes(), name


@pytest.fixture(scope="module")
def shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.mktemp("slurm") / "bert", small_tokenizer, "bert")


def test_pretraining_submitted_from_another_directory_and_a_user_error(slurm_cluster, shards, tmp_path):
    """`sbatch pretrain.sbatch` from a directory outside the repository, without logs/: the job starts (its log in
    that directory), the preset's relative paths are the repository's. Then a missing DeepSpeed config (a path on
    the command line: that directory's): the job fails once with status 2, the message once, no restart, no
    requeue."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = job_env(tmp_path)
    env.pop("LOG_DIR")
    common = [str(REPO / "launch" / "slurm" / "pretrain.sbatch"), str(REPO / "configs" / "pretrain" / "debug.yaml"),
              "--data.shards", str(shards), "--train.max_steps", "2", "--tracking.enabled", "false",
              "--data.num_workers", "0"]  # fmt: skip
    submit = ["sbatch", "--parsable"]
    good = subprocess.run([*submit, *common, "--train.output_dir", "run"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    bad = subprocess.run([*submit, *common, "--train.output_dir", "bad", "--deepspeed.config", "missing.json"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    try:
        info = wait_job(good, elsewhere / f"pretrain-{good}.out")
        text = tail(elsewhere / f"pretrain-{good}.out")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
        assert (elsewhere / "run" / "checkpoints" / "step_00000002" / "checkpoint.json").is_file()
        assert (elsewhere / "logs" / f"pretrain-{good}").is_dir()  # the per-rank logs, created by the job

        info = wait_job(bad, elsewhere / f"pretrain-{bad}.out")
        text = (elsewhere / f"pretrain-{bad}.out").read_text()
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
        assert text.count(f"deepspeed.config: {elsewhere / 'missing.json'} not found") == 1, text
        assert "not restarted" in text and "not requeued" in text, text
        attempts = sorted(p.name for p in (elsewhere / "logs" / f"pretrain-{bad}").glob("node0/*/attempt_*"))
        assert attempts == ["attempt_0"], attempts
    finally:
        subprocess.run(["scancel", good, bad], capture_output=True)


def test_pretraining_job_is_preempted_requeued_and_resumed(slurm_cluster, shards, tmp_path):
    steps = 60
    out = tmp_path / "run"
    # 2 ranks: as 2 tasks per node (a CPU partition's way) when the node has the CPUs, else NPROC_PER_NODE.
    env = job_env(tmp_path)
    alloc = ["--ntasks-per-node=2", "--cpus-per-task=1"]
    if slurm_cluster < 2:
        alloc, env["NPROC_PER_NODE"] = [], "2"
    log = tmp_path / "logs" / "pretrain-JOB.out"
    log.parent.mkdir()
    cmd = ["sbatch", "--parsable", *alloc, f"--output={log.parent}/%x-%j.out", "launch/slurm/pretrain.sbatch",
           "configs/pretrain/debug.yaml", "--data.shards", str(shards), "--train.output_dir", str(out),
           "--train.max_steps", str(steps), "--train.log_every", "1", "--checkpoint.every_steps", "1000",
           "--checkpoint.keep_last", "5", "--tracking.system_metrics", "false"]  # fmt: skip
    job_id = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    log = log.with_name(f"pretrain-{job_id}.out")
    try:
        # SIGUSR1 to the batch shell (what --signal=B:USR1@T does) once training is under way.
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 3):
            assert job_info(job_id).get("JobState") in ("PENDING", "RUNNING"), tail(log)
            assert time.time() < deadline, f"no training step within 600 s:\n{tail(log)}"
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)

        # The job requeues itself. SLURM holds a requeued job for about two minutes (BeginTime); release it
        # sooner, but not at once: slurmd revokes the old start's credential with one-second resolution, and a
        # start within that second is killed ("Job credential revoked", exit 1). Wait for the node to finish
        # cleaning up, then two seconds more.
        deadline = time.time() + 600
        while True:
            info = job_info(job_id)
            if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING":
                while node_state().startswith("completing"):
                    assert time.time() < deadline, f"node still completing job {job_id}:\n{tail(log)}"
                    time.sleep(0.5)
                time.sleep(2)
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
                break
            assert info.get("JobState") in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), f"{info}\n{tail(log)}"
            assert time.time() < deadline, f"job {job_id} was not requeued:\n{tail(log)}"
            time.sleep(0.5)
        info = wait_job(job_id, log)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)

    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{tail(log)}"
    assert info["Restarts"] == "1"
    assert "start 1 (SLURM_RESTART_COUNT=0)" in text and "start 2 (SLURM_RESTART_COUNT=1)" in text
    assert "SIGUSR1: forwarding to the ranks" in text and "requeueing job" in text

    # A checkpoint written because of the signal, before the end, and the final one.
    marks = [json.loads(p.read_text()) for p in sorted(out.glob("checkpoints/step_*/checkpoint.json"))]
    stopped = [m for m in marks if m["reason"] == "SIGUSR1"]
    assert len(stopped) == 1 and 3 <= stopped[0]["step"] < steps, marks
    assert marks[-1]["step"] == steps and marks[-1]["world_size"] == 2
    assert (out / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"
    assert f"resumed from {out / 'checkpoints' / 'step_{:08d}'.format(stopped[0]['step'])}" in text

    # Every step exactly once: none lost, none repeated.
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == marks[-1]["mlflow_run_id"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
