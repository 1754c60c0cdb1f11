"""benchmarks/gpu_check.sh --cpu-smoke: the GPU machine's one-shot check, at toy sizes on the CPU (CI)."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_runs_at_toy_sizes_on_the_cpu():
    proc = subprocess.run(["benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PIPELINE_PROGRESS": "0"}, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_check = {}
    for line in lines:
        by_check.setdefault(line["check"], []).append(line)
    assert {"gpu_tier", "env", "model", "trainer", "loader"} <= by_check.keys(), by_check.keys()
    assert by_check["gpu_tier"][0]["rc"] == 0 and "skipped" in by_check["gpu_tier"][0]["summary"]
    variants = {line.get("variant") for line in by_check["model"]}
    assert {"hf", "ours-none", "ours-compile"} <= variants
    assert all(line["tokens_per_s"] > 0 for line in by_check["model"] if "variant" in line)
    (trainer,) = by_check["trainer"]
    assert trainer["steps"] == 3 and math.isfinite(trainer["loss_last"]) and trainer["ratio_to_bare"] > 0
    assert by_check["loader"][0]["samples_per_s"] > 0
    if (REPO / ".whl").is_dir():  # `make gpu-wheels` was run here: the wheels install for Python 3.12
        assert by_check["install"][0]["wheels"] > 10
