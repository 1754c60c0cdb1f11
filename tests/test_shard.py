"""The sharder end to end on the bundled corpus: format, manifest, determinism, tasks, resume, refusals."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import DEMO_CORPUS, REPO, run_cli

from pipeline.config import build_config
from pipeline.errors import UserError
from pipeline.preprocess.config import ShardJobConfig
from pipeline.preprocess.merge import merge_parts
from pipeline.preprocess.samples import GPT_FIELD, npy_load, parse_bert
from pipeline.preprocess.sharder import run_sharding
from pipeline.tokenizer.special import SPECIAL_IDS


def shard(out: Path, tokenizer: Path, inputs=(DEMO_CORPUS,), **overrides) -> dict:
    values = {
        "input.paths": [str(p) for p in inputs],
        "data.tokenizer": str(tokenizer),
        "output.dir": str(out),
        "data.unit_bytes": 256 * 1024,
        "output.samples_per_shard": 1500,
        **overrides,
    }
    return run_sharding(build_config(ShardJobConfig, None, values))


def digest(directory: Path) -> dict[str, str]:
    names = [*sorted(p.name for p in directory.glob("*.tar")), "manifest.json"]
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in names}


def manifest_without_location(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, small_tokenizer):
    out = tmp_path_factory.mktemp("bert")
    shard(out, small_tokenizer)
    return out


def test_bert_shards_and_manifest(bert_dir, small_tokenizer):
    m = json.loads((bert_dir / "manifest.json").read_text())
    assert m["objective"] == "bert" and m["seq_len"] == 128 and m["seed"] == 12345 and m["token_dtype"] == "uint16"
    assert m["tokenizer"]["sha256"] == json.loads((small_tokenizer / "tokenizer_meta.json").read_text())["sha256"]
    assert m["inputs"] == [
        {"path": str(DEMO_CORPUS), "format": "jsonl", "bytes": DEMO_CORPUS.stat().st_size,
         "sha256": hashlib.sha256(DEMO_CORPUS.read_bytes()).hexdigest()}
    ]  # fmt: skip
    assert m["config"]["data"]["objective"] == "bert" and m["config"]["input"]["paths"] == [str(DEMO_CORPUS)]
    total = 0
    for entry in m["shards"]:
        path = bert_dir / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["bytes"] and 0 < entry["samples"] <= 1500
        total += entry["samples"]
    assert total == m["totals"]["samples"] > 5000
    assert m["stats"]["read"]["counts"]["documents"] == 123
    # Plain tar reads it: one member per sample.
    with tarfile.open(bert_dir / m["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert len(names) == m["shards"][0]["samples"] and all(n.endswith(".bert.npy") for n in names)
    # webdataset reads every sample; each is [CLS] A [SEP] B [SEP] within seq_len.
    urls = [str(bert_dir / s["name"]) for s in m["shards"]]
    count, tokens, random_next = 0, 0, 0
    for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None):
        rec = parse_bert(sample, SPECIAL_IDS.sep)
        ids = rec["input_ids"]
        assert ids.dtype == np.uint16 and len(ids) <= 128
        assert ids[0] == SPECIAL_IDS.cls and ids[-1] == SPECIAL_IDS.sep and (ids == SPECIAL_IDS.sep).sum() == 2
        assert ids[rec["len_a"] + 1] == SPECIAL_IDS.sep and rec["len_a"] >= 1
        assert not np.isin(ids[1:-1], [0, 1, 2, 4, 5, 6, 7, 8]).any()
        count += 1
        tokens += len(ids)
        random_next += rec["is_random_next"]
    assert count == m["totals"]["samples"] and tokens == m["totals"]["tokens"]
    assert random_next == m["stats"]["random_next"] and 0.45 < random_next / count < 0.6
    assert sum(m["stats"]["length_histogram"]) == count
    assert (bert_dir / "config.yaml").is_file() and (bert_dir / "report.json").is_file()


def test_gpt_blocks_overlap_by_one_and_join_documents(tmp_path, small_tokenizer):
    report = shard(tmp_path, small_tokenizer, **{"data.objective": "gpt", "data.seq_len": 64})
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["sample_fields"] == [GPT_FIELD] and report["totals"]["samples"] == m["totals"]["samples"]
    by_unit: dict[str, list[np.ndarray]] = {}
    for sample in wds.WebDataset(
        [str(tmp_path / s["name"]) for s in m["shards"]], shardshuffle=False, nodesplitter=None
    ):
        ids = npy_load(sample[GPT_FIELD])
        assert len(ids) == 65
        by_unit.setdefault(sample["__key__"].rsplit("-", 1)[0], []).append(ids)
    eods = 0
    for blocks in by_unit.values():
        for prev, nxt in itertools.pairwise(blocks):
            assert prev[-1] == nxt[0]  # inputs ids[:-1], targets ids[1:]: every token is a target once
        eods += sum(int((b[:-1] == SPECIAL_IDS.eod).sum()) for b in blocks)
    assert eods >= 100  # 123 documents, each closed by [EOD] (minus those in dropped tails)
    assert m["stats"]["tail_tokens_dropped"] < 65 * len(by_unit)


def test_byte_identical_for_any_worker_count(tmp_path, small_tokenizer, bert_dir):
    shard(tmp_path, small_tokenizer, **{"run.workers": 3})
    assert digest(tmp_path) == digest(bert_dir)


def test_task_split_then_merge_equals_single_task(tmp_path, small_tokenizer, bert_dir, monkeypatch):
    # Task 1 is writing a unit (a temporary shard) while task 0 finishes: task 0 must leave it alone.
    other_task_tmp = tmp_path / ".tmp" / "bert-000001-00000-000.tar"
    other_task_tmp.parent.mkdir(parents=True)
    other_task_tmp.write_bytes(b"being written by task 1")
    shard(tmp_path, small_tokenizer, **{"run.num_tasks": 3, "run.task_index": 0})
    assert other_task_tmp.read_bytes() == b"being written by task 1"
    with pytest.raises(UserError, match="jobs are not complete"):
        merge_parts(tmp_path)
    shard(tmp_path, small_tokenizer, **{"run.num_tasks": 3, "run.task_index": 1})
    # The last task takes its index from a SLURM array environment (array 5-7 -> index 2 of 3).
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    report = shard(tmp_path, small_tokenizer)
    assert (report["task"], report["num_tasks"], report["manifest_written"]) == (2, 3, False)
    assert not (tmp_path / "manifest.json").exists()
    merge_parts(tmp_path, verify=True)
    assert digest(tmp_path) == digest(bert_dir)
    assert not (tmp_path / ".tmp").exists()


def test_resume_after_a_killed_run(tmp_path, small_tokenizer, bert_dir):
    cmd = [
        sys.executable, "-m", "pipeline", "shard", "--input", str(DEMO_CORPUS), "--tokenizer", str(small_tokenizer),
        "--output", str(tmp_path), "--data.unit_bytes", str(256 * 1024), "--output.samples_per_shard", "1500",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PIPELINE_PROGRESS": "0"})
    records = tmp_path / ".records"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("unit-*.json"))) < 4:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_units = len(list(records.glob("unit-*.json")))
    assert 4 <= done_units < 21, "the run should have been killed part-way"
    assert not (tmp_path / "manifest.json").exists()
    # Leave the worst debris a crash can: a partial temporary shard and a truncated final-named shard.
    (tmp_path / ".tmp").mkdir(exist_ok=True)
    (tmp_path / ".tmp" / "bert-000019-00000-000.tar").write_bytes(b"partial")
    victim = sorted(tmp_path.glob("bert-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    report = shard(tmp_path, small_tokenizer)
    assert 0 < report["jobs_reused"] < 21
    assert digest(tmp_path) == digest(bert_dir)
    assert not (tmp_path / ".tmp").exists()


def test_refuses_other_config_unless_overwrite(tmp_path, small_tokenizer):
    shard(tmp_path, small_tokenizer, **{"data.objective": "gpt", "data.seq_len": 64})
    with pytest.raises(UserError, match="different config"):
        shard(tmp_path, small_tokenizer, **{"data.objective": "gpt", "data.seq_len": 32})
    report = shard(tmp_path, small_tokenizer, **{"data.objective": "gpt", "data.seq_len": 32, "output.overwrite": True})
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["seq_len"] == 32 and report["jobs_reused"] == 0
    assert {p.name for p in tmp_path.glob("*.tar")} == {s["name"] for s in m["shards"]}


def test_static_masking_writes_masks(tmp_path, small_tokenizer):
    shard(tmp_path, small_tokenizer, **{"data.static_masking": True, "data.unit_bytes": 1 << 20})
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["sample_fields"] == ["bert.npy", "mlm.npy"]
    n = 0
    for sample in wds.WebDataset([str(tmp_path / m["shards"][0]["name"])], shardshuffle=False, nodesplitter=None):
        rec = parse_bert(sample, SPECIAL_IDS.sep)
        pos, labels = rec["masked_positions"], rec["masked_labels"]
        assert 1 <= len(pos) <= 20 and len(pos) == len(labels)
        assert not np.isin(labels, list(SPECIAL_IDS.as_dict().values())).any()
        n += int((rec["input_ids"][pos] == SPECIAL_IDS.mask).sum())
    assert n > 0


def test_cli_inspect_verify_decode(bert_dir, tmp_path):
    out = run_cli("inspect", str(bert_dir), "--plot", str(tmp_path / "len.png")).stdout
    assert "NSP: IsNext" in out and "sample length (tokens):" in out and (tmp_path / "len.png").stat().st_size > 1000
    lines = run_cli("inspect", str(bert_dir), "--decode", "3", "--json").stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        rec = json.loads(line)
        assert {"tokens_a", "tokens_b", "is_random_next", "text_a", "text_b"} <= rec.keys()
        assert rec["text_a"] and rec["text_b"] and rec["is_random_next"] in (0, 1)
    assert "all" in run_cli("inspect", str(bert_dir), "--verify").stdout


def test_verify_detects_a_corrupt_shard(tmp_path, small_tokenizer):
    shard(tmp_path, small_tokenizer, **{"data.objective": "gpt"})
    victim = sorted(tmp_path.glob("*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_cli("inspect", str(tmp_path), "--verify", check=False)
    assert proc.returncode == 1 and f"sha256 mismatch: {victim.name}" in proc.stdout


def test_cli_reports_bad_inputs_and_fails_early(tmp_path, small_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    long_line = "word " * 3000  # one 15,000-character "sentence"
    (corpus / "a.txt").write_text("A first document. It has sentences. " * 40 + long_line)
    (corpus / "b.txt").write_bytes(("Caf\xe9 document. " * 50).encode("latin-1"))
    (corpus / "c.txt").write_text("  \n")
    (corpus / "d.txt").write_text("Only one sentence here")
    (corpus / "e.jsonl").write_text('{"text": "Fine one. Two. Three."}\n{broken\n')
    for i in range(5):
        (corpus / f"f{i}.txt").write_text(f"Filler document {i}. " * 30)
    out = tmp_path / "out"
    proc = run_cli("shard", "--input", str(corpus), "--tokenizer", str(small_tokenizer), "--output", str(out))
    text = proc.stdout
    for expected in (
        "empty documents (skipped): 1",
        "decoded with U+FFFD replacement (kept): 1",
        "invalid JSON lines (skipped): 1",
        "single-sentence documents 1",
        "over-long sentences cut 1",
        str(corpus / "b.txt"),
    ):
        assert expected in text, (expected, text)
    missing = run_cli("shard", "--input", str(tmp_path / "nothing"), "--tokenizer", str(small_tokenizer),
                      "--output", str(tmp_path / "never"), check=False)  # fmt: skip
    assert missing.returncode == 2 and "input not found" in missing.stderr and not (tmp_path / "never").exists()
    bad_tok = run_cli("shard", "--input", str(corpus), "--tokenizer", str(tmp_path), "--output", str(out), check=False)
    assert bad_tok.returncode == 2 and "not a tokenizer directory" in bad_tok.stderr


def test_a_failed_background_commit_is_raised_and_leaves_no_record(tmp_path):
    """Units are committed in a background thread (shards, fsync, then the record): a failure there must stop
    the job with its error, and the unit must not be recorded as done."""
    from pipeline.preprocess.records import UnitCommitter, UnitShardWriter

    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp").write_text("a file where the temporary directory goes")  # the commit cannot write under it
    writer = UnitShardWriter(out, "bert-000-00000", maxcount=10)
    writer.write("s-0", (("bert.npy", b"x" * 10),), 10)
    record = tmp_path / "unit.json"
    committer = UnitCommitter()
    committer.submit(writer, record, {"unit": "u", "shards": [], "stats": {}})
    with pytest.raises(OSError):
        committer.shutdown()
    assert not record.exists()
