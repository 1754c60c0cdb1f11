"""benchmarks/probe.py (a linear probe of frozen features) and transfer_table.py's curve of gains by labels."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, require_shared_data
from finetune_data import movie_tsv, pretrained_run


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _load("probe")
table = _load("transfer_table")


def test_the_probe_reads_a_planted_signal_and_not_noise():
    """One feature carries the label (plus noise), the others are noise: the probe must find it, and must not
    find anything in pure noise (held-out fifth and dev alike)."""
    g = torch.Generator().manual_seed(0)
    y_train, y_dev = torch.randint(0, 2, (400,), generator=g), torch.randint(0, 2, (300,), generator=g)
    noise_train, noise_dev = torch.randn(400, 16, generator=g), torch.randn(300, 16, generator=g)
    signal_train, signal_dev = noise_train.clone(), noise_dev.clone()
    signal_train[:, 3] += 4 * y_train
    signal_dev[:, 3] += 4 * y_dev
    held, dev = probe.probe(signal_train, y_train, signal_dev, y_dev, 2, seed=1)
    assert held > 0.9 and dev > 0.9
    held, dev = probe.probe(noise_train, y_train, noise_dev, y_dev, 2, seed=1)
    assert held < 0.65 and dev < 0.65


def test_overrides_after_the_double_dash_are_pairs():
    assert probe.parse_overrides(["--data.train.path", "x.tsv"]) == {"data.train.path": "x.tsv"}
    for bad in (["--data.train.path"], ["data.train.path", "x"], ["--nodot", "x"]):
        with pytest.raises(SystemExit):
            probe.parse_overrides(bad)


def test_a_checkpoint_is_probed_at_every_layer_against_random(tmp_path, tmp_path_factory, small_tokenizer):
    data = require_shared_data()
    run = pretrained_run(tmp_path_factory.getbasetemp() / "ft-pretrained", small_tokenizer, "bert")
    movies = movie_tsv(data, tmp_path / "movies.tsv", 120)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe.py"), "--start", f"tiny={run}", "--tasks", "movie-sentiment",
         "--train-examples", "80", "--dev-examples", "20", "--table", "--", "--data.train.path", str(movies)],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PIPELINE_PROGRESS": "0"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = result["tasks"]["movie-sentiment"]
    layers = ["embeddings", "layer_1", "layer_2"]  # the debug preset's two blocks
    for name in ("random", "tiny"):
        assert list(runs[name]["dev_accuracy"]) == layers and runs[name]["train_examples"] == 80
        assert all(0 <= v <= 1 for v in runs[name]["dev_accuracy"].values())
    tiny = runs["tiny"]
    assert tiny["layer"] == max(tiny["heldout_accuracy"], key=tiny["heldout_accuracy"].get)
    assert tiny["gain"] == pytest.approx(tiny["accuracy"] - runs["random"]["dev_accuracy"][tiny["layer"]], abs=1e-4)
    assert "movie-sentiment" in proc.stderr and "error ratio" in proc.stderr


def test_starts_are_named_and_random_is_reserved():
    with pytest.raises(SystemExit):
        probe.parse_starts(["random=runs/x"])
    with pytest.raises(SystemExit):
        probe.parse_starts([])


def _result(examples: int, gains: list[float], run_examples: int | None = None) -> dict:
    runs = [{"seed": s, "accuracy": 0.7, **({"train_examples": run_examples} if run_examples else {})}
            for s in range(len(gains))]  # fmt: skip
    return {"budget": {"train_examples": examples},
            "tasks": {"movie-sentiment": {"runs": {"adapted": runs, "random": runs},
                                          "gain_per_seed": {"adapted": [{"accuracy": g} for g in gains]}}}}  # fmt: skip


def test_gains_are_placed_by_labelled_examples(tmp_path):
    """Each result's per-seed gains go to its number of labelled examples; a run over all of them (budget 0)
    goes to the count its runs report; the plot is drawn from them."""
    curves = table.gain_curves([(_result(300, [0.02, 0.01]), ""), (_result(2400, [0.005, -0.004]), ""),
                                (_result(0, [-0.001], run_examples=9544), "")], "accuracy")  # fmt: skip
    assert curves == {("movie-sentiment", "adapted"): {300: [0.02, 0.01], 2400: [0.005, -0.004], 9544: [-0.001]}}
    spam = {**_result(300, [0.03]), "tasks": {"spam": _result(300, [0.03])["tasks"]["movie-sentiment"]}}
    both = {**spam, "tasks": {**spam["tasks"], **_result(300, [0.02])["tasks"]}}
    assert list(table.only_tasks(both, "spam")["tasks"]) == ["spam"] and table.only_tasks(both, "") == both
    table.plot_gains(curves, str(tmp_path / "curve.png"), "accuracy")
    assert (tmp_path / "curve.png").stat().st_size > 5000


def test_gains_are_placed_by_the_starts_pretraining_and_carry_their_seed_spread(tmp_path):
    """--plot-by pretraining: starts taken along one pre-training run become one curve per label budget, each
    at the tokens its start was pre-trained on; a start without recorded tokens is left out. The table's rows
    carry the standard deviation of the per-seed gains (the noise a gain must clear in every seed)."""

    def along(examples: int, gains: dict[str, list[float]], tokens: dict[str, int]) -> dict:
        runs = {name: [{"seed": s, "accuracy": 0.7} for s in range(len(g))] for name, g in gains.items()}
        task = {"runs": {**runs, "random": runs[next(iter(runs))]},
                "gain_per_seed": {name: [{"accuracy": x} for x in g] for name, g in gains.items()},
                "mean": {**{name: {"accuracy": 0.7} for name in gains}, "random": {"accuracy": 0.69}},
                "gain": {name: {"accuracy": sum(g) / len(g)} for name, g in gains.items()},
                "wins": {name: sum(x > 0 for x in g) for name, g in gains.items()}}  # fmt: skip
        return {"budget": {"train_examples": examples}, "tasks": {"movie-sentiment": task},
                "starts": {name: {"movie-sentiment": {"pretraining": {"step": 1, "tokens": n}}}
                           for name, n in tokens.items()}}  # fmt: skip

    result = along(2400, {"s4k": [-0.05, -0.03], "s20k": [0.01, -0.01], "export": [0.02, 0.0]},
                   {"s4k": 12_800_000, "s20k": 64_000_000})  # fmt: skip
    curves = table.gain_curves([(result, "")], "accuracy", by="pretraining")
    assert curves == {("movie-sentiment", "2400 labels"): {12_800_000: [-0.05, -0.03], 64_000_000: [0.01, -0.01]}}
    table.plot_gains(curves, str(tmp_path / "by-pretraining.png"), "accuracy", by="pretraining")
    assert (tmp_path / "by-pretraining.png").stat().st_size > 5000
    rows = {r["start"]: r for r in table.rows(result, "")}
    assert rows["s4k"]["gain_sd"] == pytest.approx(0.0141, abs=1e-4) and rows["s20k"]["seeds_better"] == "1/2"
