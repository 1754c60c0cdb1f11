"""benchmarks/transfer.py's arithmetic: per-seed gains over random, their mean, wins, the error ratio."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("transfer_benchmark", REPO / "benchmarks" / "transfer.py")
transfer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(transfer)


def test_gains_are_paired_by_seed_and_wins_need_both_metrics():
    runs = {
        "adapted": [{"accuracy": 0.80, "macro_f1": 0.78}, {"accuracy": 0.70, "macro_f1": 0.60}],
        "random": [{"accuracy": 0.70, "macro_f1": 0.70}, {"accuracy": 0.72, "macro_f1": 0.58}],
    }
    out = transfer.summarise(runs)
    per_seed = [{"accuracy": 0.1, "macro_f1": 0.08}, {"accuracy": -0.02, "macro_f1": 0.02}]
    assert out["gain_per_seed"]["adapted"] == per_seed
    assert out["mean"]["adapted"] == {"accuracy": 0.75, "macro_f1": 0.69}
    assert out["gain"]["adapted"] == {"accuracy": 0.04, "macro_f1": 0.05}
    assert out["wins"]["adapted"] == 1  # the second seed lost in accuracy
    assert out["error_ratio"]["adapted"] == pytest.approx(0.25 / 0.29, abs=1e-4)
    assert "random" not in out["gain"]


def test_starts_are_named_and_default_to_the_checkpoint():
    args = argparse.Namespace(start=[], checkpoint="runs/x")
    assert transfer.parse_starts(args) == {"pretrained": "runs/x"}
    args.start = ["adapted=runs/adapt-{task}", "general=runs/general"]
    assert transfer.parse_starts(args) == {"adapted": "runs/adapt-{task}", "general": "runs/general"}
    for bad in (["random=runs/x"], ["runs/x"], ["a=x", "a=y"]):
        args.start = bad
        with pytest.raises(SystemExit):
            transfer.parse_starts(args)


def test_table_lists_every_start_with_its_gain(capsys):
    runs = {"adapted": [{"accuracy": 0.8, "macro_f1": 0.8}], "random": [{"accuracy": 0.7, "macro_f1": 0.6}]}
    info = {"checkpoint": "runs/a", "pretraining": {"step": 840, "tokens": 3440640}}
    result = {
        "starts": {"adapted": {"movie-sentiment": info}},
        "budget": {"seeds": [1234]},
        "tasks": {"movie-sentiment": {"runs": runs, **transfer.summarise(runs)}},
    }
    transfer.print_table(result)
    rows = capsys.readouterr().err.splitlines()
    assert rows[-2].split() == ["movie-sentiment", "accuracy", "0.8000", "0.7000", "+0.1000", "1/1"]
    assert rows[-1].split() == ["movie-sentiment", "macro_f1", "0.8000", "0.6000", "+0.2000", "1/1"]
