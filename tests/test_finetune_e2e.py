"""Each fine-tuning task end to end, as a user runs it, on small real slices of ../shared/data.

A debug-preset BERT and GPT are pre-trained for a few steps on the demo corpus (once per session); each test
fine-tunes one of them for a few steps with `python -m pipeline finetune` and checks the outputs: scores in
report.json and eval/, the best checkpoint, the lineage, MLflow tags. Scores of such short runs mean nothing;
benchmarks/transfer.py measures what pre-training buys.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, require_shared_data, run_cli_in_process
from finetune_data import bigbench_slice, movie_tsv, other_tokenizer, pretrained_run, spam_dir, squad_slice

# A few steps, small batches, no MLflow unless the test is about it.
FAST = ("--train.micro_batch_size", "8", "--train.global_batch_size", "8", "--finetune.eval_batch_size", "32",
        "--optim.lr", "1e-3", "--tracking.enabled", "false", "--train.loss_curve", "false")  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return require_shared_data()


@pytest.fixture(scope="module")
def bert(tmp_path_factory, small_tokenizer) -> Path:
    return pretrained_run(tmp_path_factory.getbasetemp() / "ft-pretrained", small_tokenizer, "bert")


@pytest.fixture(scope="module")
def gpt(tmp_path_factory, small_tokenizer) -> Path:
    return pretrained_run(tmp_path_factory.getbasetemp() / "ft-pretrained", small_tokenizer, "gpt")


@pytest.fixture(autouse=True)
def _in_process_group(process_group):
    GROUP["env"] = process_group.env


GROUP: dict = {}


def finetune(config: str, checkpoint: Path, out: Path, *extra: str, check: bool = True):
    """`python -m pipeline finetune` run inside the test process (the session's one-process group)."""
    args = ["finetune", "--config", f"configs/finetune/{config}.yaml", "--checkpoint", str(checkpoint),
            "--train.output_dir", str(out), *FAST, *extra]  # fmt: skip
    proc = run_cli_in_process(*args, check=check, env=GROUP["env"])
    return proc, (json.loads((out / "report.json").read_text()) if check else None)


def test_classification_bert_movie_snippets_with_mlflow_and_report(data, bert, tmp_path):
    path = movie_tsv(data, tmp_path / "movies.tsv", 80)
    out = tmp_path / "run"
    proc, report = finetune("movie-sentiment", bert, out, "--data.train.path", str(path), "--finetune.epochs", "2",
                            "--tracking.enabled", "true", "--tracking.system_metrics", "false")  # fmt: skip
    assert report["task"] == "classification" and report["arch"] == "bert" and report["init"] == "pretrained"
    assert report["train_examples"] == 72 and report["dev_examples"] == 8  # dev_fraction 0.1
    assert report["steps"] == 18 and report["evaluations"] == 2  # 9 batches of 8 per epoch, scored per epoch
    assert 0 <= report["best"]["accuracy"] <= 1 and report["best"]["metric"] == "accuracy"
    assert sum(map(sum, report["best"]["confusion"])) == 8 and report["best"]["labels"] == ["negative", "positive"]
    assert (out / "confusion_matrix.png").stat().st_size > 5000
    best = json.loads((out / "eval" / "best.json").read_text())
    assert len(best["predictions"]) == 8 and {"uid", "label", "predicted"} <= best["predictions"][0].keys()
    assert Path(report["best_checkpoint"]).name == f"step_{best['step']:08d}"  # kept, whatever keep_last says
    lineage = json.loads((out / "lineage.json").read_text())
    parent = json.loads((bert / "checkpoints" / "step_00000004" / "checkpoint.json").read_text())["mlflow_run_id"]
    assert lineage["pretraining"]["mlflow_run_id"] == parent and lineage["pretraining"]["step"] == 4
    assert lineage["data_files"]["train"]["sha256"] and lineage["tokenizer"]["vocab_size"] == 2000
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["best"]["step"] == best["step"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["parent_run_id"] == parent and run.data.tags["task_kind"] == "classification"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_accuracy")] == [9, 18]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "confusion_matrix.png", "lineage.json", "best.json", "config.yaml"} <= artifacts


@pytest.mark.slow  # two fine-tuning runs
def test_packed_finetuning_follows_the_unpacked_run(data, bert, tmp_path):
    """finetune.packing computes the same examples in fewer rows: without dropout the same losses step by step."""
    from train_helpers import losses

    path = movie_tsv(data, tmp_path / "movies.tsv", 80)
    runs = {}
    for packing in ("true", "false"):
        out = tmp_path / f"packing-{packing}"
        _, runs[packing] = finetune("movie-sentiment", bert, out, "--data.train.path", str(path),
                                    "--finetune.epochs", "1", "--finetune.packing", packing, "--finetune.dropout", "0",
                                    "--finetune.head_dropout", "0")  # fmt: skip
        runs[packing]["losses"] = losses(out)
    assert list(runs["true"]["losses"]) == list(range(1, 10))
    for step, loss in runs["false"]["losses"].items():
        assert runs["true"]["losses"][step] == pytest.approx(loss, rel=1e-4), step
    assert runs["true"]["best"]["accuracy"] == runs["false"]["best"]["accuracy"]


@pytest.mark.slow
def test_classification_bert_spam_mails_from_the_archive_layout(data, bert, tmp_path):
    directory = spam_dir(data, tmp_path / "spam", per_class=12)
    _, report = finetune("spam", bert, tmp_path / "run", "--data.train.path", str(directory),
                         "--finetune.epochs", "1", "--data.dev_fraction", "0.25")  # fmt: skip
    assert report["train_examples"] == 18 and report["dev_examples"] == 6
    assert report["data"]["train"]["truncated"] > 0  # mails are longer than 128 tokens: counted, not dropped


def test_classification_gpt1_with_auxiliary_lm(data, gpt, tmp_path):
    path = movie_tsv(data, tmp_path / "movies.tsv", 40)
    out = tmp_path / "run"
    _, report = finetune("gpt-movie-sentiment", gpt, out, "--data.train.path", str(path), "--finetune.epochs", "1",
                         "--optim.lr", "1e-3")  # fmt: skip
    assert report["arch"] == "gpt" and report["steps"] == 5
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("lm_loss" in r for r in logged)  # the auxiliary objective (weight 0.5, gpt1.yaml) is on


@pytest.mark.parametrize("arch", ["bert", pytest.param("gpt", marks=pytest.mark.slow)])
def test_pair_classification_vitaminc(data, bert, gpt, tmp_path, arch):
    path = bigbench_slice(data, "vitaminc_task.json.gz", tmp_path / "vitaminc.json", 48, step=97)
    _, report = finetune("vitaminc", bert if arch == "bert" else gpt, tmp_path / "run", "--data.train.path",
                         str(path), "--finetune.epochs", "1", "--data.dev_fraction", "0.25")  # fmt: skip
    assert report["arch"] == arch and report["dev_examples"] == 12
    assert len(report["best"]["confusion"]) == 3 and report["best"]["labels"] == ["True", "False", "Neither"]


@pytest.mark.parametrize("arch", ["bert", pytest.param("gpt", marks=pytest.mark.slow)])
def test_multiple_choice_social_iqa(data, bert, gpt, tmp_path, arch):
    path = bigbench_slice(data, "social_iqa_task.json.gz", tmp_path / "siqa.json", 40)
    out = tmp_path / "run"
    _, report = finetune("social-iqa", bert if arch == "bert" else gpt, out, "--data.train.path", str(path),
                         "--finetune.epochs", "1")  # fmt: skip
    assert report["task"] == "multiple_choice" and report["dev_examples"] == 8
    best = json.loads((out / "eval" / "best.json").read_text())
    assert {"uid", "answer", "predicted"} <= best["predictions"][0].keys()


def test_squad11_bert_with_doc_stride_and_a_bad_answer_offset(data, bert, tmp_path):
    path = squad_slice(data, tmp_path / "squad.json", articles=4, paragraphs=2, questions=4)
    squad = json.loads(path.read_text())
    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"] = [{"text": "no such words", "answer_start": 5}]
    path.write_text(json.dumps(squad))
    out = tmp_path / "run"
    _, report = finetune("squad11", bert, out, "--data.train.path", str(path), "--data.dev_fraction", "0.25",
                         "--finetune.epochs", "1", "--task.max_seq_len", "64", "--task.doc_stride", "24",
                         "--task.max_query_len", "16")  # fmt: skip
    counts = report["data"]["train"] if report["data"]["train"]["answer_offset_mismatch"] else report["data"]["dev"]
    assert counts["answer_offset_mismatch"] == 1
    assert report["data"]["train"]["strided"] > 0  # 64-token windows over paragraphs of ~150 tokens
    assert {"exact_match", "f1"} <= report["best"].keys() and report["best"]["metric"] == "f1"
    best = json.loads((out / "eval" / "best.json").read_text())
    assert len(best["predictions"]) == report["dev_examples"] and best["nbest"]


@pytest.mark.parametrize("arch", ["bert", pytest.param("gpt", marks=pytest.mark.slow)])
def test_squad20_emulated_unanswerable_questions(data, bert, gpt, tmp_path, arch):
    path = squad_slice(data, tmp_path / "squad.json", articles=4, paragraphs=2, questions=4)
    out = tmp_path / "run"
    _, report = finetune("squad20", bert if arch == "bert" else gpt, out, "--data.train.path", str(path),
                         "--data.dev_fraction", "0.5", "--finetune.epochs", "1", "--task.max_seq_len", "64",
                         "--task.doc_stride", "24", "--task.max_query_len", "16", "--task.unanswerable_fraction",
                         "0.5")  # fmt: skip
    best = report["best"]
    assert best["metric"] == "best_f1"
    assert best["HasAns_total"] > 0 and best["NoAns_total"] > 0
    assert best["HasAns_total"] + best["NoAns_total"] == best["total"] == report["dev_examples"]
    assert {"exact", "f1", "best_exact", "best_f1_thresh", "NoAns_f1", "best_HasAns_f1"} <= best.keys()


def test_a_tokenizer_that_does_not_match_the_checkpoint_fails_before_training(data, bert, tmp_path, tmp_path_factory):
    other = other_tokenizer(tmp_path_factory.getbasetemp() / "ft-pretrained")
    path = movie_tsv(data, tmp_path / "movies.tsv", 20)
    proc, _ = finetune("movie-sentiment", bert, tmp_path / "run", "--data.train.path", str(path), "--tokenizer",
                       str(other), check=False)  # fmt: skip
    assert proc.returncode == 2 and "is not the one" in proc.stderr and "trained with" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_labels_outside_the_set_and_too_long_inputs_fail_before_training(data, bert, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "good film", "label": "positive"}\n{"text": "so-so", "label": "mixed"}\n')
    jsonl = ("--data.train.format", "jsonl", "--data.train.text_field", "text", "--data.train.label_field", "label")
    proc, _ = finetune("movie-sentiment", bert, tmp_path / "run", "--data.train.path", str(path), *jsonl,
                       "--data.train.label_threshold", "none", check=False)  # fmt: skip
    assert proc.returncode == 2 and "bad.jsonl:2: label 'mixed' is not one of task.labels" in proc.stderr
    proc, _ = finetune("movie-sentiment", bert, tmp_path / "run", "--data.train.path", str(path),
                       "--task.max_seq_len", "512", check=False)  # fmt: skip
    assert proc.returncode == 2 and "exceeds the model's 128 positions" in proc.stderr


@pytest.mark.slow
def test_two_ranks_train_and_score_as_one_rank_with_accumulation(data, bert, tmp_path):
    """Same global batches (16 = 2 ranks x 8 = 1 rank x 8 x 2 accumulation), no dropout: the same losses and
    dev scores, so batches are dealt to ranks without overlap and evaluation gathers every rank's slice."""
    import os
    import subprocess
    import sys

    path = movie_tsv(data, tmp_path / "movies.tsv", 80)  # 64 to train, 16 to score: whole global batches
    common = ["--data.train.path", str(path), "--data.dev_fraction", "0.2", "--finetune.epochs", "2",
              "--finetune.dropout", "0", "--finetune.head_dropout", "0", "--train.global_batch_size", "16",
              "--train.log_every", "1", "--finetune.eval_every", "2", "--finetune.eval_batch_size", "3"]  # fmt: skip
    finetune("movie-sentiment", bert, tmp_path / "one", *common)
    args = ["finetune", "--config", "configs/finetune/movie-sentiment.yaml", "--checkpoint", str(bert),
            "--train.output_dir", str(tmp_path / "two"), *FAST, *common]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pipeline"]
    env = {**os.environ, "PIPELINE_PROGRESS": "0"}
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def read(run: str, name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / run / name).read_text().splitlines()]

    one, two = read("one", "metrics.jsonl"), read("two", "metrics.jsonl")
    assert len(one) == len(two) == 8
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    scores_one, scores_two = read("one", "eval/history.jsonl"), read("two", "eval/history.jsonl")
    assert [s["step"] for s in scores_one] == [2, 4, 6, 8]
    for a, b in zip(scores_one, scores_two, strict=True):
        assert a["accuracy"] == b["accuracy"]


def test_own_json_array_data_from_random_initialisation(bert, tmp_path):
    """README, "Your own data, and random initialisation": a YAML outside the repository that includes a preset,
    replaces its data.train (!replace) with a JSON array file beside it, integer labels mapped by label_map."""
    import gzip

    with gzip.open(REPO / "data_shards" / "demo_finetune" / "movie_snippets_3k.tsv.gz", "rt", encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh]
    records = [{"review": r[2], "stars": int(float(r[1]) > 0)} for r in rows[:40]]
    (tmp_path / "reviews.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    (tmp_path / "my-sentiment.yaml").write_text(
        f"include: {REPO / 'configs' / 'finetune' / 'movie-sentiment.yaml'}\n"
        "data:\n  train: !replace\n    path: reviews.json\n    text_field: review\n    label_field: stars\n"
        "    label_map: {0: negative, 1: positive}\n  dev_fraction: 0.2\n"
        "train:\n  output_dir: runs/my-sentiment\n"
    )  # fmt: skip
    args = ["finetune", "--config", str(tmp_path / "my-sentiment.yaml"), "--checkpoint", str(bert),
            "--init.weights", "random", *FAST, "--finetune.epochs", "1"]  # fmt: skip
    proc = run_cli_in_process(*args, env=GROUP["env"])
    out = tmp_path / "runs" / "my-sentiment"  # relative to the YAML file's directory
    report = json.loads((out / "report.json").read_text())
    assert report["init"] == "random" and report["train_examples"] == 32 and report["dev_examples"] == 8
    assert json.loads(proc.stdout.strip().splitlines()[-1])["init"] == "random"
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["init"]["weights"] == "random" and lineage["data_files"]["train"]["path"] == str(
        tmp_path / "reviews.json")  # fmt: skip
