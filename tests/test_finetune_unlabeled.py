"""`python -m pipeline unlabeled`: a task's training texts as a corpus, its dev split never in it."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import require_shared_data
from finetune_data import bigbench_slice, movie_tsv

from pipeline.cli import main
from pipeline.config import build_config
from pipeline.finetune.config import FinetuneJobConfig
from pipeline.finetune.data import _split
from pipeline.text.readers import InputConfig, ReadStats, read_file, resolve_inputs


@pytest.fixture(scope="module")
def data():
    return require_shared_data()


def _read(path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def test_movie_training_texts_without_the_dev_split(data, tmp_path, capsys):
    tsv = movie_tsv(data, tmp_path / "movies.tsv", 300)
    out = tmp_path / "corpus" / "movie.jsonl.gz"
    args = ["unlabeled", "--config", "configs/finetune/movie-sentiment.yaml", "--data.train.path", str(tsv)]
    args += ["--data.max_train_examples", "50", "--output", str(out)]  # the limit is ignored: all of train
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = build_config(FinetuneJobConfig, "configs/finetune/movie-sentiment.yaml", {"data.train.path": str(tsv)})
    train, dev = _split(cfg)
    texts = _read(out)
    assert report["train_examples"] == len(train) == 270 and report["dev_examples_held_out"] == len(dev) == 30
    assert set(texts) == {e.text.strip() for e in train} and len(texts) == report["documents"]
    assert not set(texts) & {e.text.strip() for e in dev}  # adapting on this never reads a scored text
    # the file is a pre-training input: the corpus reader takes it as one document per line
    files, ignored = resolve_inputs([str(out.parent)])
    docs = [d.text for f in files for d in read_file(f, InputConfig(), ReadStats())]
    assert not ignored and docs == texts


def test_another_subset_seed_draws_other_training_examples_from_the_same_split(data, tmp_path):
    """data.subset_seed moves only the max_train_examples draw: the dev set, and so what a task-adapted
    pre-training held out, stays; data.seed would move the hold-out too."""
    tsv = movie_tsv(data, tmp_path / "movies.tsv", 300)

    def split(**extra):
        over = {"data.train.path": str(tsv), "data.max_train_examples": 100, **extra}
        train, dev = _split(build_config(FinetuneJobConfig, "configs/finetune/movie-sentiment.yaml", over))
        return [e.text for e in train], [e.text for e in dev]

    (train, dev), (same, same_dev) = split(), split(**{"data.subset_seed": 1234})  # default: data.seed
    other, other_dev = split(**{"data.subset_seed": 1})
    held_out = set(split(**{"data.max_train_examples": 0})[0])
    assert (same, same_dev) == (train, dev) and other_dev == dev and len(other) == 100
    assert set(other) != set(train) and set(other) <= held_out  # another draw, still from the training split
    assert split(**{"data.seed": 1})[1] != dev


def test_pairs_give_both_texts_once(data, tmp_path, capsys):
    path = bigbench_slice(data, "vitaminc_task.json.gz", tmp_path / "vitaminc.json", 200)
    out = tmp_path / "vitaminc.jsonl"
    args = ["unlabeled", "--config", "configs/finetune/vitaminc.yaml", "--data.train.path", str(path)]
    assert main([*args, "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert report["texts"] == 2 * report["train_examples"]  # evidence and claim of every example
    assert report["duplicates"] > 0 and len(texts) == len(set(texts)) == report["documents"]
    assert report["texts"] == report["documents"] + report["duplicates"] + report["empty"]


def test_an_output_the_corpus_readers_cannot_take_is_refused(tmp_path, capsys):
    args = ["unlabeled", "--config", "configs/finetune/movie-sentiment.yaml", "--output", str(tmp_path / "x.txt")]
    assert main(args) == 2
    assert ".jsonl" in capsys.readouterr().err and not (tmp_path / "x.txt").exists()
