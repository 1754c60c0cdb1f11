"""Multi-process pre-training under torchrun (CPU, gloo): ZeRO-2 on 2 ranks vs 1 process, and resuming a
2-rank checkpoint on 1 rank (universal checkpoint) with the data position kept."""

from __future__ import annotations

import json
import shutil

import pytest
from train_helpers import build_shards, losses, start_train, train_args

pytestmark = pytest.mark.slow

# No dropout, so that ranks and processes draw the same computation whatever their RNG streams.
BASE = [
    "--model.hidden_dropout", "0", "--model.attention_dropout", "0", "--tracking.enabled", "false",
    "--train.micro_batch_size", "8", "--train.global_batch_size", "16", "--checkpoint.every_steps", "3",
]  # fmt: skip


def zero(stage: int, config: str = "") -> list[str]:
    return ["--train.zero_stage", str(stage), "--deepspeed.config", config or f"configs/deepspeed/zero{stage}.json"]


COMMON = [*BASE, *zero(2)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.mktemp("dist") / "bert", small_tokenizer, "bert")


def run(args, log, nproc=0):
    proc = start_train(args, log, torchrun=nproc)
    rc = proc.wait(timeout=900)
    assert rc == 0, log.read_text()[-4000:]


def test_two_ranks_with_zero2_match_one_process(shards, tmp_path):
    """Same samples per step (2 readers either way), so per-step losses must agree up to float reduction order.
    With LAMB, this also checks the per-parameter trust ratios across ZeRO-2's flat partitions."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(train_args(shards, one, *COMMON, "--train.max_steps", "8", "--data.num_workers", "2"), tmp_path / "one.log")
    run(train_args(shards, two, *COMMON, "--train.max_steps", "8", "--data.num_workers", "1"), tmp_path / "two.log", 2)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-4), (step, a[step], b[step])
    assert a[8] < a[1]


def test_resume_on_another_world_size_keeps_the_data_position_and_logs_each_step_once(shards, tmp_path):
    """Two ranks to step 6 (checkpoints at 3 and 6), then on in two copies of the run: on two ranks from step 6,
    and on one rank from step 3 (step 6's checkpoint removed: as if the job had died after logging steps 4-6),
    through a universal checkpoint. The one-rank run repeats steps 4-10 as two ranks took them, and its
    metrics.jsonl and MLflow run hold each step once."""
    tracked = ["--tracking.enabled", "true", "--tracking.system_metrics", "false", "--train.log_every", "2"]
    common = [*COMMON, "--schedule.decay", "constant"]  # steps 4-6 have the same lr whether max_steps is 6 or 10
    first = tmp_path / "first"
    run(train_args(shards, first, *common, *tracked, "--train.max_steps", "6", "--data.num_workers", "1"),
        tmp_path / "first.log", 2)  # fmt: skip
    same, fewer = tmp_path / "same", tmp_path / "fewer"
    shutil.copytree(first, same)
    shutil.copytree(first, fewer)
    shutil.rmtree(fewer / "checkpoints" / "step_00000006")
    run(
        train_args(shards, same, *common, "--train.max_steps", "10", "--data.num_workers", "1"),
        tmp_path / "same.log",
        2,
    )
    run(
        train_args(shards, fewer, *common, *tracked, "--train.max_steps", "10", "--data.num_workers", "2"),
        tmp_path / "fewer.log",
    )
    assert "universal" in (tmp_path / "fewer.log").read_text()
    a, b = losses(same), losses(fewer)
    # Steps 4-10 on one rank (from the universal checkpoint) continue exactly where two ranks would have.
    for step in range(4, 11):
        assert b[step] == pytest.approx(a[step], rel=2e-4), (step, a[step], b[step])
    summary = json.loads((tmp_path / "fewer.log").read_text().strip().splitlines()[-1])
    assert summary["step"] == 10 and summary["samples"] == 160
    steps = [json.loads(line)["step"] for line in (fewer / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{fewer / 'mlflow.db'}")
    history = client.get_metric_history(summary["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8, 10]


def test_zero3_with_every_parameter_partitioned_matches_zero1(shards, tmp_path):
    """ZeRO-3 gathers the weights that fused kernels and the tied MLM decoder read directly: same losses."""
    common = [*BASE, "--optim.name", "adamw", "--train.max_steps", "4", "--data.num_workers", "1"]
    z1, z3 = tmp_path / "z1", tmp_path / "z3"
    run(train_args(shards, z1, *common, *zero(1)), tmp_path / "z1.log", 2)
    everything = "tests/configs/zero3-partition-everything.json"
    run(train_args(shards, z3, *common, *zero(3, everything)), tmp_path / "z3.log", 2)
    a, b = losses(z1), losses(z3)
    assert sorted(a) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)
