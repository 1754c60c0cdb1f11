"""Pre-training on one process (CPU, gloo): outputs, golden loss curve, exact resume, MLflow, faults."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_cli, run_cli_in_process
from train_helpers import (
    assert_same_losses,
    build_shards,
    kill_group,
    losses,
    records,
    start_train,
    train_args,
    wait_for,
)

GOLDEN = REPO / "tests" / "golden" / "debug_bert_losses.json"
STEPS = 16
# The default tier keeps the core (outputs, golden curve, exact resume, refused configs, NaN skips); the
# rest (one or two more CLI runs each, ~15-35 s on a 2-core runner) is marked slow so that the default
# tier stays well under CI's 15 minutes. CI runs both tiers.


@pytest.fixture(scope="module")
def bert_shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.mktemp("shards") / "bert", small_tokenizer, "bert")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, bert_shards, process_group):
    """The debug preset for 16 steps, uninterrupted, checkpointing every 4 steps (`pipeline train` run inside
    the test process; the killed run below is a real process)."""
    out = tmp_path_factory.mktemp("run") / "ref"
    args = train_args(bert_shards, out, "--train.max_steps", str(STEPS), "--checkpoint.every_steps", "4")
    return out, run_cli_in_process(*args, env=process_group.env)


def test_run_writes_checkpoints_metrics_plot_and_mlflow(reference_run):
    out, proc = reference_run
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == STEPS and summary["samples"] == 16 * STEPS
    ckpts = out / "checkpoints"
    published = sorted(p.name for p in ckpts.iterdir() if (p / "checkpoint.json").exists())
    assert published == ["step_00000012", "step_00000016"]  # keep_last 2
    assert (ckpts / "latest").read_text() == "step_00000016"
    mark = json.loads((ckpts / "step_00000016" / "checkpoint.json").read_text())
    assert mark["world_size"] == 1 and mark["mlflow_run_id"] == summary["mlflow_run_id"]
    assert {"mp_rank_00_model_states.pt", "rank_00000_state.pt"} <= set(mark["files"])
    per_step = losses(out)
    assert sorted(per_step) == list(range(1, STEPS + 1))
    assert sum(list(per_step.values())[-4:]) / 4 < per_step[1] - 0.05  # the loss falls
    assert (out / "loss_curve.png").stat().st_size > 5000 and (out / "config.yaml").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == str(STEPS) and run.data.params["model.arch"] == "bert"
    assert {"world_size", "git_commit", "torch", "deepspeed"} <= run.data.tags.keys()
    for metric in ("loss", "mlm_loss", "nsp_acc", "lr", "grad_norm", "tokens_per_s", "samples_per_s"):
        assert metric in run.data.metrics, metric
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [5, 10, 15, 16]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "manifest.json", "metrics.jsonl", "loss_curve.png"} <= artifacts


def test_golden_loss_curve(reference_run):
    """The debug preset's first steps, bit for bit up to float noise: refactors must not change training."""
    out, _ = reference_run
    got = losses(out)
    if os.environ.get("PIPELINE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({str(k): v for k, v in got.items()}, indent=1) + "\n")
    golden = {int(k): v for k, v in json.loads(GOLDEN.read_text()).items()}
    assert list(golden) == list(got)
    for step, value in golden.items():
        assert got[step] == pytest.approx(value, rel=1e-4, abs=1e-5), step
    # The curve itself must move: a model that learns nothing stays at ln(2000) + ln(2) = 8.29 for every step.
    uniform = math.log(2000) + math.log(2)
    assert golden[1] == pytest.approx(uniform, abs=0.05)
    assert sum(list(golden.values())[-4:]) / 4 < uniform - 0.8


def test_killed_run_resumes_to_the_same_losses_and_logs_each_step_once(reference_run, bert_shards, tmp_path,
                                                                       process_group):  # fmt: skip
    """kill -9 of the whole job two steps past a log step and five past its last checkpoint: the resumed run
    takes steps 9-16 again, and metrics.jsonl and MLflow still hold each step once."""
    ref, _ = reference_run
    out = tmp_path / "killed"
    args = train_args(bert_shards, out, "--train.max_steps", str(STEPS), "--checkpoint.every_steps", "8")
    proc = start_train(args, tmp_path / "first.log")
    wait_for(out / "checkpoints" / "step_00000008" / "checkpoint.json", proc)
    while max([r["step"] for r in records(out)], default=0) < 11:  # MLflow has step 10 (log_every 5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.02)
    kill_group(proc)
    before = losses(out)
    assert 11 <= max(before) < STEPS, "the run must have been killed part-way"
    first_run_id = json.loads((out / "checkpoints" / "step_00000008" / "checkpoint.json").read_text())["mlflow_run_id"]
    resumed = run_cli_in_process(*args, env=process_group.env)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["step"] == STEPS
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))  # each step once, in order
    assert_same_losses(losses(out), losses(ref))  # same data, masks, dropout and optimizer state
    assert summary["mlflow_run_id"] == first_run_id  # the same MLflow run continues
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    history = client.get_metric_history(first_run_id, "loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 16]
    logged = {m.step: m.value for m in sorted(history, key=lambda m: m.step)}
    assert_same_losses(logged, {step: losses(ref)[step] for step in (5, 10, 15, 16)})


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_closed_by_the_next_start(bert_shards, tmp_path, process_group):
    """kill -9 before any checkpoint: nothing can continue that attempt's MLflow run, so the next start (from
    step 0, in a new run) marks it FAILED and names its successor, rather than leaving it RUNNING for ever."""
    out = tmp_path / "run"
    args = train_args(bert_shards, out, "--train.max_steps", "8", "--checkpoint.every_steps", "0",
                      "--tracking.system_metrics", "false", "--train.loss_curve", "false")  # fmt: skip
    proc = start_train(args, tmp_path / "first.log")
    wait_for(out / "metrics.jsonl", proc)
    while max([r["step"] for r in records(out)], default=0) < 6:  # MLflow holds step 5 (log_every 5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.02)
    kill_group(proc)
    resumed = run_cli_in_process(*args, env=process_group.env)
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8
    assert [r["step"] for r in records(out)] == list(range(1, 9))  # started over: each step once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("debug").experiment_id])
    new = client.get_run(summary["mlflow_run_id"])
    (old,) = [run for run in runs if run.info.run_id != new.info.run_id]
    assert old.info.status == "FAILED", old.info.status
    assert old.data.tags["pipeline.superseded_by"] == new.info.run_id
    assert new.info.status == "FINISHED"


def test_damaged_shards_are_counted_in_metrics_mlflow_and_the_summary(bert_shards, tmp_path, process_group):
    """4 KiB of garbage in each shard: training goes on, and what was lost is in every sink, not only in logs."""
    import random
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(bert_shards, shards)
    for path in sorted(shards.glob("*.tar")):
        data = bytearray(path.read_bytes())
        for at in (10_000, len(data) // 2):  # within the first shuffle window, and in the middle
            data[at : at + 4096] = random.Random(at).randbytes(4096)
        path.write_bytes(bytes(data))
    out = tmp_path / "run"
    args = train_args(shards, out, "--train.max_steps", "4", "--train.log_every", "2", "--checkpoint.every_steps",
                      "0", "--tracking.system_metrics", "false", "--train.loss_curve", "false")  # fmt: skip
    proc = run_cli_in_process(*args, env=process_group.env)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["data_read_errors"] >= 1 and summary["data_samples_substituted"] >= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "data_read_errors" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert (logged[-1]["data_read_errors"], logged[-1]["data_samples_substituted"]) == (
        summary["data_read_errors"], summary["data_samples_substituted"])  # fmt: skip

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for name in ("data_read_errors", "data_samples_substituted"):
        history = client.get_metric_history(summary["mlflow_run_id"], name)
        assert [m.step for m in history] == [2, 4] and history[-1].value == summary[name]


def test_configs_that_cannot_work_fail_before_training(bert_shards, small_tokenizer, tmp_path):
    cases = [
        (["--train.global_batch_size", "20", "--train.micro_batch_size", "8"], "not divisible"),
        (["--train.precision", "fp16"], "fp16 needs a CUDA GPU"),
        (["--model.arch", "gpt"], "does not match the shards' objective"),
        (["--tokenizer", str(tmp_path / "other-tok")], "not a tokenizer directory"),
        (["--optim.fused", "deepspeed"], "DeepSpeed's FusedLamb is another recipe"),
    ]
    for extra, message in cases:  # in-process: each fails before any process group or weights exist
        proc = run_cli_in_process(*train_args(bert_shards, tmp_path / "never", *extra), check=False)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert message in proc.stderr, (message, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never" / "checkpoints").exists()


def test_user_errors_are_one_line_before_deepspeed_is_imported(bert_shards, tmp_path):
    """Wrong paths fail in seconds with exit 2 and one line, before DeepSpeed (and its start-up) is imported."""
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--data.shards", str(tmp_path / "missing")], "no such shard directory"),
        (["--data.shards", str(tmp_path / "a_file")], "is a file, not a shard directory"),
        (["--data.shards", str(bert_shards / "manifest.json")], f"give its directory, {bert_shards}"),
        (["--data.shards", str(bert_shards), "--train.output_dir", str(tmp_path / "a_file" / "run")],
         "cannot create it"),
        (["--data.shards", str(bert_shards), "--deepspeed.config", str(tmp_path / "zero9.json")], "not found"),
        (["--data.shards", str(bert_shards), "--train.output_dir", str(tmp_path / "run"), "--checkpoint.resume",
          str(tmp_path / "nowhere")], "no published checkpoint"),
    ]  # fmt: skip
    script = """if True:
        import contextlib, io, json, sys, time
        from pipeline.cli import main
        results = []
        for extra in json.loads(sys.argv[1]):
            start, err = time.time(), io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["train", "--config", "configs/pretrain/debug.yaml", *extra])
            results.append({"code": code, "stderr": err.getvalue(), "seconds": time.time() - start})
        print(json.dumps({"results": results, "deepspeed_imported": "deepspeed" in sys.modules}))
    """
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([extra for extra, _ in cases])], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for (extra, message), result in zip(cases, out["results"], strict=True):
        assert result["code"] == 2, (extra, result)
        lines = result["stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (extra, result)
        assert result["seconds"] < 30, result  # the first case imports torch; DeepSpeed's start-up was 40-120 s
    assert not out["deepspeed_imported"]


def test_deepspeed_builds_nothing_on_a_cpu_start(process_group):
    """DeepSpeed's CPU backend JIT-built its shm all-reduce op when it started (40-120 s with a cold extensions
    cache, a lock left behind by a killed build): the process group of this session was made without it."""
    import deepspeed.comm.comm as ds_comm

    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None


@pytest.mark.slow
def test_a_cold_start_compiles_nothing_and_stdout_is_the_summary(bert_shards, tmp_path):
    """A training start with an empty torch extensions cache reaches its steps without building anything into
    it, and its stdout is the JSON summary alone (DeepSpeed's "... built successfully" went there)."""
    extensions = tmp_path / "torch_extensions"
    start = time.time()
    proc = run_cli(*train_args(bert_shards, tmp_path / "run", "--train.max_steps", "1"),
                   env={"TORCH_EXTENSIONS_DIR": str(extensions)})  # fmt: skip
    seconds = time.time() - start
    assert not extensions.exists() or not any(extensions.iterdir()), list(extensions.rglob("*"))
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1, proc.stdout
    assert seconds < 300, seconds  # the build alone took 40-120 s (an idle 2-core runner: about 10 s in all)


@pytest.mark.slow
def test_tokenizer_that_differs_from_the_shards_is_refused(bert_shards, tmp_path):
    other = tmp_path / "tok2"
    run_cli("tokenizer", "--input", str(REPO / "data_shards/demo_corpus/sotu_1900-2021.jsonl.gz"),
            "--vocab-size", "1000", "--output", str(other))  # fmt: skip
    proc = run_cli(*train_args(bert_shards, tmp_path / "never", "--tokenizer", str(other)), check=False)
    assert proc.returncode == 2 and "sha256" in proc.stderr


@pytest.mark.slow
def test_unreachable_tracking_server_warns_and_training_continues(bert_shards, tmp_path):
    out = tmp_path / "notrack"
    proc = run_cli(*train_args(bert_shards, out, "--train.max_steps", "2", "--tracking-uri", "http://127.0.0.1:9"))
    assert "MLflow" in proc.stderr and "training continues" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 2


@pytest.mark.slow
def test_gpt_pretraining(tmp_path, small_tokenizer):
    shards = build_shards(tmp_path / "gpt", small_tokenizer, "gpt")
    out = tmp_path / "run"
    run_cli(*train_args(shards, out, "--train.max_steps", "6", "--train.log_every", "3",
                        config="configs/pretrain/debug-gpt.yaml"))  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert "lm_loss" in records[2] and 0 <= records[2]["lm_acc"] <= 1


@pytest.mark.slow
def test_phase_two_starts_from_phase_one_weights_with_a_fresh_schedule(reference_run, small_tokenizer, tmp_path):
    """BERT's recipe: phase 2 (longer sequences) loads phase 1's weights, not its optimizer or step count."""
    phase1, _ = reference_run
    shards_128 = build_shards(tmp_path / "bert128", small_tokenizer, "bert", seq_len=128)
    common = ["--train.max_steps", "3", "--tracking.enabled", "false", "--data.max_predictions_per_seq", "20"]
    warm = tmp_path / "phase2"
    run_cli(*train_args(shards_128, warm, *common, "--train.init_from", str(phase1)))
    cold = tmp_path / "scratch"
    run_cli(*train_args(shards_128, cold, *common))
    warm_records = [json.loads(line) for line in (warm / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in warm_records] == [1, 2, 3]  # a fresh step count
    cold_records = [json.loads(line) for line in (cold / "metrics.jsonl").read_text().splitlines()]
    assert warm_records[0]["lr"] == cold_records[0]["lr"]  # a fresh schedule (warmup restarts)
    assert warm_records[0]["loss"] < cold_records[0]["loss"] - 0.05  # but trained weights


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses(bert_shards, tmp_path):
    common = ["--train.max_steps", "3", "--tracking.enabled", "false", "--checkpoint.every_steps", "0"]
    run_cli(*train_args(bert_shards, tmp_path / "plain", *common))
    run_cli(*train_args(bert_shards, tmp_path / "ckpt", *common, "--model.activation_checkpointing", "true"))
    plain, recomputed = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    for step in plain:
        assert recomputed[step] == pytest.approx(plain[step], rel=1e-6)


@pytest.mark.slow
def test_an_unpublished_checkpoint_is_ignored_and_cleaned_up(reference_run, bert_shards, tmp_path):
    """What a crash during a save leaves (a tag without checkpoint.json, `latest` not moved) is never loaded."""
    import shutil

    src, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    debris = out / "checkpoints" / "step_00000020"
    debris.mkdir()
    (debris / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    args = train_args(bert_shards, out, "--train.max_steps", "18", "--checkpoint.every_steps", "4",
                      "--tracking.enabled", "false")  # fmt: skip
    summary = json.loads(run_cli(*args).stdout.strip().splitlines()[-1])
    assert summary["step"] == 18 and summary["samples"] == 18 * 16  # continued step 16's state, not the debris
    assert not debris.exists()
