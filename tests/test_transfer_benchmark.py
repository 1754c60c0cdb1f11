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


def test_multiple_choice_and_squad_are_compared_on_the_metrics_they_report(capsys):
    """Social IQa reports accuracy only, SQuAD exact match and F1 in percent: each task is summarised, won and
    tabulated on its own metrics, and SQuAD's error ratio is taken on the 0-100 scale."""
    choice = {
        "pretrained": [{"accuracy": 0.40, "metric": "accuracy"}, {"accuracy": 0.36, "metric": "accuracy"}],
        "random": [{"accuracy": 0.35, "metric": "accuracy"}, {"accuracy": 0.37, "metric": "accuracy"}],
    }
    out = transfer.summarise(choice)
    assert out["metrics"] == ["accuracy"] and out["metric"] == "accuracy"
    assert out["gain"]["pretrained"] == {"accuracy": 0.02} and out["wins"]["pretrained"] == 1
    assert out["error_ratio"]["pretrained"] == pytest.approx(0.62 / 0.64, abs=1e-4)
    squad = {
        "pretrained": [{"exact_match": 10.0, "f1": 20.0, "metric": "f1"}],
        "random": [{"exact_match": 5.0, "f1": 10.0, "metric": "f1"}],
    }
    out_squad = transfer.summarise(squad)
    assert out_squad["metrics"] == ["exact_match", "f1"] and out_squad["metric"] == "f1"
    assert out_squad["error_ratio"]["pretrained"] == pytest.approx(80 / 90, abs=1e-4)
    assert out_squad["wins"]["pretrained"] == 1
    info = {"checkpoint": "runs/a", "pretraining": {"step": 4, "tokens": 2048}}
    result = {
        "starts": {"pretrained": {"social-iqa": info, "squad11": info}},
        "budget": {"seeds": [1234, 1]},
        "tasks": {"social-iqa": {"runs": choice, **out}, "squad11": {"runs": squad, **out_squad}},
    }
    transfer.print_table(result)
    rows = capsys.readouterr().err.splitlines()
    assert rows[-3].split() == ["social-iqa", "accuracy", "0.3800", "0.3600", "+0.0200", "1/2"]
    assert rows[-1].split() == ["squad11", "f1", "20.0000", "10.0000", "+10.0000", "1/2"]


def test_without_a_random_baseline_only_means_are_reported():
    out = transfer.summarise({"pretrained": [{"accuracy": 0.5, "macro_f1": 0.4, "metric": "accuracy"}]})
    assert out["mean"] == {"pretrained": {"accuracy": 0.5, "macro_f1": 0.4}}
    assert out["gain"] == {} and out["wins"] == {}


def test_table_columns_stay_apart_for_long_start_names():
    from pipeline.evaluate.transfer import format_table

    names = ["bert-adapted", "bert-general"]
    mean = {n: {"accuracy": 0.5} for n in [*names, "random"]}
    result = {
        "budget": {"seeds": [1]},
        "starts": {n: {} for n in names},
        "tasks": {
            "movie-sentiment": {
                "metrics": ["accuracy"],
                "mean": mean,
                "gain": {n: {"accuracy": 0.0} for n in names},
                "wins": dict.fromkeys(names, 0),
            }
        },
    }
    header = format_table(result).splitlines()[-2].split()
    assert header[2:5] == ["bert-adapted", "bert-general", "random"]
