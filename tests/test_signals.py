"""Stop signals as clusters and users send them (to the whole process group, at any moment of a run), and the
resumed runs that follow them: each step logged once.

SLURM's time limit and `scancel` (SIGTERM), its pre-emption warning (SIGUSR1) and Ctrl-C (SIGINT) reach every
process of a job: the data loader's workers as well as the rank. The rank checkpoints at the next step and
exits 0 (or, before its first step, exits 0 at once); the workers outlive the signal and end with their loader,
and no process of the job is left behind. The resumed run then logs each step once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli_in_process
from train_helpers import (
    forked_children,
    group_alive,
    records,
    start_train,
    train_args,
    train_in_process,
    wait_for,
    wait_for_handler,
)

from data_shards import build_shards
from pipeline.data import DataConfig, PretrainLoader
from pipeline.train.policy import StopFlags

pytestmark = pytest.mark.timeout(900)  # a hang is one of the failures these tests guard against


@pytest.fixture(scope="module")
def bert_shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.getbasetemp() / "data", small_tokenizer, "bert")


def test_loader_workers_outlive_stop_signals_and_end_with_their_iteration(bert_shards):
    loader = PretrainLoader(DataConfig(shards=str(bert_shards), num_workers=1), micro_batch_size=8)
    before = set(multiprocessing.active_children())
    batches = loader.iterate(0)
    next(batches)  # the worker is running
    (worker,) = set(multiprocessing.active_children()) - before
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # what SLURM / a terminal send to the group
        os.kill(worker.pid, sig)
    time.sleep(0.5)
    for _ in range(5):
        next(batches)  # torch's own SIGTERM handler would have ended the worker: "DataLoader worker ... killed"
    assert worker.is_alive()
    batches.close()  # its iteration ends: so does the worker, although it ignores the signals
    assert not worker.is_alive()


def test_workers_of_an_unclosed_iteration_do_not_hold_up_the_exit(bert_shards):
    """Workers that ignore SIGTERM cannot be ended by multiprocessing's exit hook (SIGTERM, then join): a
    script that stops iterating without closing must still exit, and take its workers with it."""
    script = textwrap.dedent(f"""
        import multiprocessing, sys, faulthandler
        faulthandler.dump_traceback_later(240, exit=True)  # a hang: where it waits, on stderr
        from pipeline.data import DataConfig, PretrainLoader
        loader = PretrainLoader(DataConfig(shards={str(bert_shards)!r}, num_workers=2), micro_batch_size=8)
        batches = iter(loader)
        next(batches)  # and the generator stays open until the interpreter exits
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_stop_flags_take_every_stop_signal_and_a_second_ctrl_c_gives_up():
    before = {sig: signal.getsignal(sig) for sig in StopFlags.SIGNALS}
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        stop = StopFlags().install()
        try:
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler runs in this (the main) thread at its next bytecode
            assert stop.requested and stop.signal_name == sig.name
        finally:
            stop.uninstall()
    stop = StopFlags().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        stop.uninstall()
    assert {sig: signal.getsignal(sig) for sig in StopFlags.SIGNALS} == before


def test_a_stop_before_the_first_step_exits_at_once(bert_shards, tmp_path, process_group):
    """A signal during start-up: no step, no checkpoint, no metrics, no MLflow run (a requeued job starts over
    from the previous checkpoint, into the previous run)."""
    stop = StopFlags()
    stop.requested, stop.signal_name = True, "SIGTERM"  # as its handler leaves it
    out = tmp_path / "run"
    result = train_in_process(bert_shards, out, {"train.max_steps": 4}, process_group, stop=stop)
    assert result["stopped_by_signal"] and result["step"] == 0
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert not (out / "metrics.jsonl").exists() and not (out / "mlflow.db").exists()


def _stopped_attempt(args, log, sig, when) -> dict:
    """Start `pipeline train` in its own process group, wait for ``when(proc, log)``, signal the whole group;
    the attempt must exit 0 with its JSON summary and leave no process of the group behind."""
    proc = start_train(args, log)
    try:
        when(proc, log)
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    deadline = time.time() + 10
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid), "a process of the job (a loader worker?) outlived it"
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["stopped_by_signal"] is True
    return summary


def _published(out) -> dict[int, dict]:
    marks = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("step_*/checkpoint.json")]
    return {m["step"]: m for m in marks}


@pytest.mark.slow
def test_group_signals_at_every_moment_then_each_step_once(bert_shards, tmp_path, process_group):
    """One run stopped four times by a signal to its whole process group (num_workers 1): during start-up,
    while the loader's worker starts, mid-training and around a checkpoint save; then resumed to the end."""
    steps = 16
    out = tmp_path / "run"
    args = train_args(bert_shards, out, "--train.max_steps", str(steps), "--checkpoint.every_steps", "4",
                      "--checkpoint.keep_last", "10", "--data.num_workers", "1")  # fmt: skip

    # Start-up (SLURM's pre-emption warning): the handlers are in place, DeepSpeed is not even imported yet:
    # exit 0 before the first step.
    summary = _stopped_attempt(args, tmp_path / "startup.log", signal.SIGUSR1,
                               lambda proc, log: wait_for_handler(proc, signal.SIGUSR1))  # fmt: skip
    assert summary["step"] == 0
    assert not (out / "mlflow.db").exists() and not _published(out)

    # Loader warm-up (SLURM's time limit, scancel): the epoch's DataLoader worker has just started (a moment
    # later, as here, torch's own SIGTERM handler in it would end it; the moment of the fork is covered too:
    # the signals are blocked until the worker ignores them).
    def warming_up(proc, log):
        # The epoch's first log line comes just before its DataLoader (a fork before it: a subprocess starting)
        while "data epoch 0:" not in log.read_text() or not forked_children(proc.pid):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.005)
        time.sleep(0.2)

    summary = _stopped_attempt(args, tmp_path / "warmup.log", signal.SIGTERM, warming_up)
    marks = _published(out)
    assert summary["step"] >= 1 and marks[summary["step"]]["reason"] == "SIGTERM"

    # Mid-training, Ctrl-C in a terminal (SIGINT to the foreground group).
    def training(proc, log, past=summary["step"] + 3):
        while max([r["step"] for r in records(out)], default=0) < past:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.01)

    summary = _stopped_attempt(args, tmp_path / "training.log", signal.SIGINT, training)
    assert _published(out)[summary["step"]]["reason"] == "SIGINT"

    # Around a scheduled checkpoint: its tag directory has just appeared.
    def saving(proc, log, tag=out / "checkpoints" / f"step_{(summary['step'] // 4 + 1) * 4:08d}"):
        wait_for(tag, proc)

    summary = _stopped_attempt(args, tmp_path / "save.log", signal.SIGTERM, saving)
    assert _published(out)[summary["step"]]["reason"] == "SIGTERM"

    result = run_cli_in_process(*args, env=process_group.env)
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["step"] == steps and not final["stopped_by_signal"]
    assert [r["step"] for r in records(out)] == list(range(1, steps + 1))  # each step once, in order
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("debug").experiment_id])) == 1
    assert sorted(m.step for m in client.get_metric_history(final["mlflow_run_id"], "loss")) == [5, 10, 15, 16]
    assert client.get_run(final["mlflow_run_id"]).info.status == "FINISHED"


def _four_step_finetuning(small_tokenizer, tmp_path_factory, tmp_path) -> tuple[Path, list[str]]:
    """The run directory and CLI arguments of a 4-step fine-tuning of a tiny BERT on 80 movie reviews, scored and
    checkpointed every 2 steps (every checkpoint kept)."""
    from conftest import require_shared_data
    from finetune_data import movie_tsv, pretrained_run

    data = require_shared_data()
    bert = pretrained_run(tmp_path_factory.getbasetemp() / "ft-pretrained", small_tokenizer, "bert")
    out = tmp_path / "run"
    args = ["finetune", "--config", "configs/finetune/movie-sentiment.yaml", "--checkpoint", str(bert),
            "--train.output_dir", str(out), "--data.train.path", str(movie_tsv(data, tmp_path / "movies.tsv", 80)),
            "--train.micro_batch_size", "8", "--train.global_batch_size", "8", "--finetune.epochs", "0",
            "--train.max_steps", "4", "--finetune.eval_every", "2", "--checkpoint.every_steps", "2",
            "--checkpoint.keep_last", "10", "--tracking.enabled", "false", "--train.loss_curve", "false"]  # fmt: skip
    return out, args


def test_a_resumed_finetuning_logs_each_step_and_evaluation_once(small_tokenizer, tmp_path_factory, tmp_path,
                                                                   process_group):  # fmt: skip
    """A fine-tuning run whose checkpoint of step 4 is gone (as if it had died after scoring step 4) takes steps
    3-4 again: metrics.jsonl and eval/history.jsonl still hold each step once."""
    out, args = _four_step_finetuning(small_tokenizer, tmp_path_factory, tmp_path)
    run_cli_in_process(*args, env=process_group.env)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    report = json.loads(run_cli_in_process(*args, env=process_group.env).stdout.strip().splitlines()[-1])
    assert report["steps"] == 4
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    assert [r["step"] for r in records(out, "eval/history.jsonl")] == [2, 4]


def test_a_best_score_of_an_attempt_that_died_before_its_checkpoint_is_not_kept(small_tokenizer, tmp_path_factory,
                                                                                 tmp_path, process_group):  # fmt: skip
    """eval/best.json is written when a score improves, the checkpoint of that step just after. An attempt that
    died in between (kill -9 during the save) left a best.json of a step that no checkpoint holds, with a score
    the re-taken step need not reproduce (another world size, another loader layout). The resumed run must
    report the scores it made, not the dead attempt's: best.json comes back to what the checkpoint it resumed
    from had, and agrees with the history and the best checkpoint at the end."""
    out, args = _four_step_finetuning(small_tokenizer, tmp_path_factory, tmp_path)
    run_cli_in_process(*args, env=process_group.env)
    # The dead attempt: step 4 scored higher than anything this run can score, best.json written, no checkpoint.
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    best = json.loads((out / "eval" / "best.json").read_text())
    metric = best["metric"]
    best.update(step=4, metrics={**best["metrics"], metric: 2.0})
    (out / "eval" / "best.json").write_text(json.dumps(best))

    report = json.loads(run_cli_in_process(*args, env=process_group.env).stdout.strip().splitlines()[-1])
    assert report["steps"] == 4
    history = {r["step"]: r[metric] for r in records(out, "eval/history.jsonl")}
    assert sorted(history) == [2, 4]
    best = json.loads((out / "eval" / "best.json").read_text())
    assert best["metrics"][metric] == max(history.values()) != 2.0
    assert best["metrics"][metric] == history[best["step"]]
    assert report["best"]["step"] == best["step"] and report["best_checkpoint"].endswith(f"step_{best['step']:08d}")


@pytest.mark.slow
def test_group_signal_during_a_finetuning_evaluation(small_tokenizer, tmp_path_factory, tmp_path, process_group):
    """SIGTERM to the job as the dev set is being scored (it starts right after the step's record is written):
    a checkpoint, exit 0, and the resumed run scores each evaluation step once."""
    from conftest import require_shared_data
    from finetune_data import movie_tsv, pretrained_run

    data = require_shared_data()
    bert = pretrained_run(tmp_path_factory.getbasetemp() / "ft-pretrained", small_tokenizer, "bert")
    out = tmp_path / "run"
    args = ["finetune", "--config", "configs/finetune/movie-sentiment.yaml", "--checkpoint", str(bert),
            "--train.output_dir", str(out), "--data.train.path", str(movie_tsv(data, tmp_path / "movies.tsv", 800)),
            "--data.dev_fraction", "0.5", "--train.micro_batch_size", "8", "--train.global_batch_size", "8",
            "--finetune.epochs", "0", "--train.max_steps", "6", "--finetune.eval_every", "2",
            "--checkpoint.every_steps", "0", "--train.loss_curve", "false",
            "--tracking.system_metrics", "false"]  # fmt: skip

    def evaluating(proc, log):
        while not (out / "metrics.jsonl").is_file() or 2 not in [r["step"] for r in records(out)]:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.005)

    summary = _stopped_attempt(args, tmp_path / "eval.log", signal.SIGTERM, evaluating)
    assert summary["steps"] >= 2 and _published(out)[summary["steps"]]["reason"] == "SIGTERM"
    report = json.loads(run_cli_in_process(*args, env=process_group.env).stdout.strip().splitlines()[-1])
    assert report["steps"] == 6 and not report["stopped_by_signal"]
    assert [r["step"] for r in records(out)] == list(range(1, 7))
    assert [r["step"] for r in records(out, "eval/history.jsonl")] == [2, 4, 6]
