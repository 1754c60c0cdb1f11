"""MLflow against a real tracking server: a run is recorded there, and a server that dies mid-run only warns."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from train_helpers import build_shards, start_train, train_args

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("the MLflow server did not become healthy")
        time.sleep(0.5)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_run_is_recorded_on_the_server_and_survives_its_death(mlflow_server, small_tokenizer, tmp_path):
    url, server = mlflow_server
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
