"""MLflow against a real tracking server: a run is recorded there, and a server that dies mid-run only warns."""

from __future__ import annotations

import json
import os
import time

import pytest
from mlflow_server import mlflow_server
from train_helpers import build_shards, start_train, train_args

pytestmark = pytest.mark.slow


@pytest.fixture()
def server(tmp_path):
    with mlflow_server(tmp_path) as (url, proc):
        yield url, proc


def test_run_is_recorded_on_the_server_and_survives_its_death(server, small_tokenizer, tmp_path):
    url, server = server
    shards = build_shards(tmp_path / "shards", small_tokenizer, "bert")
    out = tmp_path / "run"
    args = train_args(shards, out, "--train.max_steps", "40", "--train.log_every", "2", "--tracking-uri", url,
                      "--checkpoint.every_steps", "0")  # fmt: skip
    proc = start_train(args, tmp_path / "train.log")
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 6:
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "train.log").read_text()[-3000:]
        time.sleep(0.1)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("debug").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["train.max_steps"] == "40"
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 2
    os.killpg(server.pid, 9)  # the tracking server dies mid-run
    server.wait()
    assert proc.wait(timeout=600) == 0
    log = (tmp_path / "train.log").read_text()
    assert "training continues" in log
    assert json.loads(log.strip().splitlines()[-1])["step"] == 40
