"""The launchers' dry runs: the commands they would run for a given allocation, their checks and usage text.

Fast and needs no cluster. The same scripts run for real in test_launch_multinode.py (torchrun on loopback) and
test_slurm.py (a local SLURM cluster).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

LAUNCH = REPO / "launch"
SCRIPTS = [
    LAUNCH / "torchrun.sh",
    LAUNCH / "slurm" / "pretrain.sbatch",
    LAUNCH / "slurm" / "finetune.sbatch",
    LAUNCH / "slurm" / "shard.sbatch",
    LAUNCH / "slurm" / "merge.sbatch",
    LAUNCH / "slurm" / "preprocess.sh",
    LAUNCH / "local_slurm" / "start.sh",
    LAUNCH / "local_slurm" / "stop.sh",
]
CONFIG = "configs/pretrain/debug.yaml"


def launch(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a launch script with a clean SLURM/torchrun environment plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "MASTER_", "RDZV_"))}
    for key in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "LOG_DIR"):
        base.pop(key, None)
    base["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


TORCHRUN = "pipeline.train.torchrun"  # torchrun that does not restart a user error (exit status 2)


def torchrun_argv(line: str) -> list[str]:
    """The arguments after `python -m pipeline.train.torchrun` in a printed command line."""
    words = shlex.split(line)
    return words[words.index(TORCHRUN) + 1 :]


def parse_torchrun(argv: list[str]):
    """Parse with torchrun's own parser: every flag the launchers pass exists in this torch."""
    from torch.distributed.run import get_args_parser

    return get_args_parser().parse_args(argv)


def test_scripts_are_valid_bash_with_usage():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert os.access(script, os.X_OK), f"{script} is not executable"


def stub_commands(directory, names: list[str]) -> None:
    """Executables that only record that they were called (in ``directory/calls``)."""
    directory.mkdir(exist_ok=True)
    for name in names:
        path = directory / name
        path.write_text(f'#!/bin/sh\necho {name} "$@" >> {directory / "calls"}\n')
        path.chmod(0o755)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_script_answers_help_and_does_nothing_else(tmp_path, flag):
    """Each launcher prints its usage, wherever the flag is, and calls nothing: no sbatch, srun, torchrun,
    scontrol, apt-get or daemon (all replaced by stubs that record calls)."""
    stubs = tmp_path / "bin"
    stub_commands(stubs, ["sbatch", "srun", "scontrol", "sinfo", "scancel", "apt-get", "slurmctld", "slurmd", "munged",
                          "munge", "unmunge", "runuser", "mungekey", "install", "python", "torchrun"])  # fmt: skip
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": str(stubs / "python")}
    for script in SCRIPTS:
        name = str(script.relative_to(LAUNCH))
        if name == "local_slurm/stop.sh":
            continue  # below: its kill is a shell builtin, no stub can stand in for it
        for args in ([flag], ["--dry-run", CONFIG, flag], ["train", CONFIG, "--train.max_steps", "2", flag]):
            if name.startswith("local_slurm") and args != [flag]:
                continue
            proc = launch(name, *args, env=env, check=False)
            assert proc.returncode == 0, (name, args, proc.stderr)
            assert "usage:" in proc.stdout and "#SBATCH" not in proc.stdout, (name, args)
            assert not (stubs / "calls").exists(), (name, args, (stubs / "calls").read_text())


def test_stop_script_help_stops_nothing(tmp_path):
    """`stop.sh --help` with the daemons' pid files naming processes of this test: they must live on. As root it
    runs in a mount namespace whose /run is empty but for those files, so a regression cannot stop a real
    cluster."""
    if os.geteuid() == 0 and shutil.which("unshare") is None:
        pytest.skip("as root, stop.sh is only tried inside a mount namespace (unshare)")
    sleepers = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]
    try:
        run_dir = tmp_path / "run"
        (run_dir / "munge").mkdir(parents=True)
        for name, proc in zip(("slurmd.pid", "slurmctld.pid", "munge/munged.pid"), sleepers, strict=True):
            (run_dir / name).write_text(f"{proc.pid}\n")
        script = LAUNCH / "local_slurm" / "stop.sh"
        if os.geteuid() == 0:
            cmd = ["unshare", "-m", "sh", "-c", f"mount --bind {run_dir} /run && exec bash {script} --help"]
        else:  # not root: /run's real pid files are not this user's to kill; the test's sleepers cannot be named
            cmd = ["bash", str(script), "--help"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
        assert "stopped" not in proc.stdout and all(p.poll() is None for p in sleepers)
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    sourced = [LAUNCH / "common.sh", LAUNCH / "slurm" / "torchrun_job.sh"]
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS + sourced)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_torchrun_launcher_for_one_node_and_for_several():
    one = launch("torchrun.sh", "--dry-run", "--nproc-per-node", "2", "train", CONFIG, "--train.max_steps", "5")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in one.stdout and "OMP_NUM_THREADS=" in one.stdout
    args = parse_torchrun(torchrun_argv(one.stdout))
    assert shlex.split(one.stdout)[4:6] == ["-m", TORCHRUN]
    assert args.standalone and args.nproc_per_node == "2" and args.nnodes == "1"
    assert args.training_script == "pipeline" and args.module
    assert args.training_script_args == ["train", "--config", CONFIG, "--train.max_steps", "5"]
    assert "SIGUSR1" in args.signals_to_handle.split(",") and args.max_restarts == 3

    node1 = launch("torchrun.sh", "--dry-run", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
                   "10.0.0.1:29400", "--max-restarts", "5", "--log-dir", "/tmp/x", "finetune", CONFIG)  # fmt: skip
    args = parse_torchrun(torchrun_argv(node1.stdout))
    assert not args.standalone and args.nnodes == "2" and args.rdzv_backend == "c10d"
    assert args.rdzv_endpoint == "10.0.0.1:29400" and args.max_restarts == 5 and args.log_dir == "/tmp/x/node1"
    assert args.training_script_args[:1] == ["finetune"]
    # the same from the environment
    env = launch("torchrun.sh", "--dry-run", "train", CONFIG,
                 env={"NNODES": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "1234", "NPROC_PER_NODE": "4"})  # fmt: skip
    args = parse_torchrun(torchrun_argv(env.stdout))
    assert args.rdzv_endpoint == "h0:1234" and args.nproc_per_node == "4"
    static = launch("torchrun.sh", "--dry-run", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h0:1",
                    "train", CONFIG, env={"RDZV_BACKEND": "static"})  # fmt: skip
    args = parse_torchrun(torchrun_argv(static.stdout))
    assert args.rdzv_backend == "static" and args.node_rank == 1


def test_torchrun_launcher_errors_are_clear():
    cases = [
        ((), "usage:"),
        (("train", "configs/nope.yaml"), "no such file: configs/nope.yaml"),
        (("eval", CONFIG), "COMMAND must be train or finetune"),
        (("--nnodes", "2", "train", CONFIG), "needs --rdzv-endpoint"),
        (("--bogus", "train", CONFIG), "unknown option --bogus"),
    ]
    for args, message in cases:
        proc = launch("torchrun.sh", "--dry-run", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = launch("torchrun.sh", "train", CONFIG, env={"PYTHON": "/nonexistent/python"}, check=False)
    assert proc.returncode == 2 and "no Python at /nonexistent/python" in proc.stderr


def slurm_env(**extra: str) -> dict:
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "pretrain", "SLURM_JOB_NODELIST": "node07",
            "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_ON_NODE": "32", **extra}  # fmt: skip


def pretrain_dry_run(env: dict, script: str = "slurm/pretrain.sbatch") -> tuple[list[str], object]:
    out = launch(script, "--dry-run", CONFIG, "--train.max_steps", "7", env=env).stdout.splitlines()
    srun = shlex.split(next(line for line in out if line.startswith("srun ")))
    node = parse_torchrun(torchrun_argv(next(line for line in out if TORCHRUN in line)))
    return srun, node


def test_pretrain_sbatch_runs_one_torchrun_per_node_with_ranks_from_the_allocation():
    srun, node = pretrain_dry_run(slurm_env(SLURM_GPUS_ON_NODE="8"))
    assert srun[0] == "srun" and srun[6].endswith("launch/torchrun.sh")
    assert srun[1:6] == ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=1"]
    # the rendezvous at the first node, port 20000 + job id % 10000, id = the job id
    assert node.nproc_per_node == "8" and node.rdzv_endpoint == "node07:24242" and node.rdzv_id == "4242"
    assert node.rdzv_backend == "c10d" and node.log_dir == "logs/pretrain-4242/node0"
    assert node.training_script_args == ["train", "--config", CONFIG, "--train.max_steps", "7"]
    # GPUs from CUDA_VISIBLE_DEVICES; on CPU partitions the tasks per node; NPROC_PER_NODE wins over all
    assert pretrain_dry_run(slurm_env(CUDA_VISIBLE_DEVICES="0,1,2,3"))[1].nproc_per_node == "4"
    assert pretrain_dry_run(slurm_env(SLURM_NTASKS_PER_NODE="2"))[1].nproc_per_node == "2"
    assert pretrain_dry_run(slurm_env())[1].nproc_per_node == "1"
    assert pretrain_dry_run(slurm_env(SLURM_GPUS_ON_NODE="8", NPROC_PER_NODE="3"))[1].nproc_per_node == "3"
    _, node = pretrain_dry_run(slurm_env(MASTER_PORT="5555", LOG_DIR="/scratch/logs", MAX_RESTARTS="0"))
    assert node.rdzv_endpoint == "node07:5555" and node.log_dir == "/scratch/logs/pretrain-4242/node0"
    assert node.max_restarts == 0


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) expands node lists")
def test_pretrain_sbatch_rendezvous_at_the_first_of_several_nodes():
    env = slurm_env(SLURM_JOB_NODELIST="gpu[03-04,09]", SLURM_JOB_NUM_NODES="3", SLURM_JOB_CPUS_PER_NODE="32(x2),16")
    srun, node = pretrain_dry_run(env)
    assert "--nodes=3" in srun and "--ntasks=3" in srun
    assert "--cpus-per-task=16" in srun  # the step must fit on the node with the fewest CPUs
    assert node.nnodes == "3" and node.rdzv_endpoint == "gpu03:24242"


def test_sbatch_headers_ask_for_requeue_and_the_preemption_signal():
    for name in ("pretrain", "finetune"):
        text = (LAUNCH / "slurm" / f"{name}.sbatch").read_text()
        # the job's log in the submit directory, which always exists (sbatch creates no directory)
        for line in ("--requeue", "--signal=B:USR1@120", "--open-mode=append", "--output=%x-%j.out"):
            assert f"#SBATCH {line}" in text, (name, line)


def test_finetune_sbatch_runs_the_finetune_command():
    srun, node = pretrain_dry_run(slurm_env(SLURM_JOB_NAME="finetune"), script="slurm/finetune.sbatch")
    assert node.training_script_args[:3] == ["finetune", "--config", CONFIG]
    assert "finetune" in srun


def test_pretrain_sbatch_outside_slurm():
    proc = launch("slurm/pretrain.sbatch", CONFIG, check=False)
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr
    proc = launch("slurm/pretrain.sbatch", "configs/nope.yaml", env=slurm_env(), check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = launch("slurm/pretrain.sbatch", "--dry-run", CONFIG)  # a one-node view of this machine
    # the job's name and ranks are the real job's (#SBATCH --job-name, --ntasks-per-node), and what the
    # allocation decides is said
    assert "srun --nodes=1" in proc.stdout and TORCHRUN in proc.stdout
    assert "# job 0 (pretrain): 1 node(s)" in proc.stdout and "x 1 ranks = 1 ranks" in proc.stdout
    assert "logs/pretrain-0/node0" in proc.stdout and " logs/train-0" not in proc.stdout
    assert "unknown until sbatch grants it" in proc.stderr
    out = launch("slurm/finetune.sbatch", "--dry-run", CONFIG, env={"NPROC_PER_NODE": "4"}).stdout
    assert "# job 0 (finetune): 1 node(s)" in out and "x 4 ranks = 4 ranks" in out
    out = launch("slurm/pretrain.sbatch", "--dry-run", CONFIG, env={"SBATCH_JOB_NAME": "p1"}).stdout
    assert "# job 0 (p1)" in out and "logs/p1-0/node0" in out


def test_preprocessing_array_then_dependent_merge():
    env = {"NUM_TASKS": "8", "CPUS_PER_TASK": "4", "SBATCH_ARGS": "--partition cpu --time 1:00:00",
           "MERGE_ARGS": "--verify"}  # fmt: skip
    out = launch("slurm/preprocess.sh", "--dry-run", "configs/preprocess/demo-bert.yaml", "--tokenizer", "tok",
                 "--output", "out/shards", "--seq-len", "64", env=env).stdout.splitlines()  # fmt: skip
    array, merge = (shlex.split(line) for line in out)
    assert array[:2] == ["sbatch", "--parsable"] and "--array=0-7" in array and "--cpus-per-task=4" in array
    assert array[-7:] == ["configs/preprocess/demo-bert.yaml", "--tokenizer", "tok", "--output", "out/shards",
                          "--seq-len", "64"]  # fmt: skip
    assert array[-8].endswith("launch/slurm/shard.sbatch") and "--partition" in array
    assert "--dependency=afterok:ARRAY_JOB_ID" in merge and merge[-3].endswith("launch/slurm/merge.sbatch")
    assert merge[-2:] == [str(REPO / "out" / "shards"), "--verify"]
    assert f"--output={REPO / 'logs'}/%x-%A_%a.out" in array  # absolute: the directory preprocess.sh creates
    proc = launch("slurm/preprocess.sh", "--dry-run", "configs/preprocess/demo-bert.yaml", check=False)
    assert proc.returncode == 2 and "pass --output DIR" in proc.stderr
    proc = launch("slurm/preprocess.sh", "--dry-run", "configs/preprocess/demo-bert.yaml", "--output=x",
                  env={"NUM_TASKS": "0"}, check=False)  # fmt: skip
    assert proc.returncode == 2 and "NUM_TASKS" in proc.stderr


def test_shard_and_merge_tasks():
    env = {"SLURM_JOB_ID": "11", "SLURM_ARRAY_JOB_ID": "10", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "6"}  # fmt: skip
    out = launch("slurm/shard.sbatch", "--dry-run", "configs/preprocess/demo-bert.yaml", "--output", "o", env=env)
    words = shlex.split(out.stdout)
    assert words[1:] == ["-m", "pipeline", "shard", "--workers", "6", "--config", "configs/preprocess/demo-bert.yaml",
                         "--output", "o"]  # fmt: skip
    assert "array task 1 of 2" in out.stderr
    out = launch("slurm/merge.sbatch", "--dry-run", "some/dir").stdout
    assert shlex.split(out)[1:] == ["-m", "pipeline", "merge", "some/dir"]


def test_a_user_error_of_a_rank_off_the_console_is_shown_once(tmp_path, capsys):
    """torchrun.sh shows local rank 0 only (--tee 3 --local-ranks-filter 0). When another rank fails the check
    first, torchrun kills rank 0 before it prints the message (seen in a slow-tier run: "(an error to fix, shown
    above)" with nothing above): the launcher then prints the failing rank's last lines from its log file."""
    from types import SimpleNamespace

    from pipeline.train.torchrun import _show_hidden_errors

    rank_dir = tmp_path / "attempt_0" / "1"
    rank_dir.mkdir(parents=True)
    (rank_dir / "stderr.log").write_text("loading\nerror: deepspeed.config: missing.json not found\n")
    failures = {
        1: SimpleNamespace(exitcode=2, local_rank=1, error_file=str(rank_dir / "error.json")),
        0: SimpleNamespace(exitcode=-15, local_rank=0, error_file=str(tmp_path / "attempt_0/0/error.json")),
    }
    args = ["--nproc-per-node", "2", "--tee", "3", "--local-ranks-filter", "0", "-m", "pipeline", "train"]
    _show_hidden_errors(failures, args)
    assert capsys.readouterr().err.count("error: deepspeed.config: missing.json not found") == 1
    # Rank 0 on the console failed the same way: its message is there already, nothing is repeated.
    _show_hidden_errors({**failures, 0: SimpleNamespace(exitcode=2, local_rank=0, error_file="")}, args)
    # Every rank on the console (no --tee, or no filter): nothing to add.
    _show_hidden_errors(failures, ["--nproc-per-node", "2", "-m", "pipeline", "train"])
    _show_hidden_errors(failures, ["--tee", "3", "-m", "pipeline", "train"])
    assert capsys.readouterr().err == ""
    # --redirects without --tee: no rank on the console.
    _show_hidden_errors(failures, ["--redirects=3", "-m", "pipeline", "train"])
    assert "missing.json not found" in capsys.readouterr().err
    # A rank that wrote no error.json: torch gives its error file as '<N/A>' (seen in a slow-tier run); the log
    # is found under torchrun's --log-dir instead.
    logged = tmp_path / "logs" / "run-id" / "attempt_0" / "1"
    logged.mkdir(parents=True)
    (logged / "stderr.log").write_text("error: deepspeed.config: other.json not found\n")
    failures[1] = SimpleNamespace(exitcode=2, local_rank=1, error_file="<N/A>")
    _show_hidden_errors(failures, ["--log-dir", str(tmp_path / "logs"), *args])
    assert capsys.readouterr().err.count("error: deepspeed.config: other.json not found") == 1
