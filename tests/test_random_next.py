"""Where NotNext segments come from: corpus-wide partner windows (every input kind, deterministic for any
worker count and task split) and single-sentence documents as Google's recipe treats them."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import DEMO_CORPUS, run_cli

from pipeline.config import build_config
from pipeline.preprocess.bert_pairs import RandomNextPool, UnitTokens, create_unit_pairs
from pipeline.preprocess.config import ShardJobConfig
from pipeline.preprocess.merge import merge_parts
from pipeline.preprocess.partners import PartnerIndex, _whole_characters
from pipeline.preprocess.plan import plan_jobs
from pipeline.preprocess.samples import parse_bert
from pipeline.preprocess.sharder import run_sharding
from pipeline.text.readers import InputConfig, ReadStats, read_file, resolve_inputs
from pipeline.text.sentences import RuleSplitter
from pipeline.tokenizer.special import SPECIAL_IDS
from pipeline.tokenizer.spm import Tokenizer


def demo_documents() -> list[str]:
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def test_whole_characters_drops_cut_multibyte_characters():
    raw = "aé€😀b".encode()  # 1 + 2 + 3 + 4 + 1 bytes
    for start in range(len(raw)):
        for end in range(start + 1, len(raw) + 1):
            piece = _whole_characters(raw[start:end], start > 0, end < len(raw))
            text = piece.decode("utf-8")  # never raises
            assert text in "aé€😀b"
            assert len(piece) >= (end - start) - 6  # at most one partial character dropped at each end


# -- the windows --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    """One directory with every job kind: whole-file .txt (files jobs), a large .jsonl and a split .jsonl.gz
    (range jobs), a Parquet file of several row groups, and a .jsonl.gz too large to split (a stream job)."""
    root = tmp_path_factory.mktemp("mixed")
    texts = [t[:16000] for t in demo_documents()]  # 2 MB in all: quick to shard several times
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(texts[i], encoding="utf-8")
    (root / "big.jsonl").write_bytes(_jsonl(texts[20:40]))
    (root / "split.jsonl.gz").write_bytes(gzip.compress(_jsonl(texts[40:55])))
    pq.write_table(pa.table({"text": texts[55:75]}), root / "rows.parquet", row_group_size=4)
    (root / "stream.jsonl.gz").write_bytes(gzip.compress(_jsonl(texts[75:123])))
    return root


MIXED_INPUT = {"gzip_split_max_bytes": 400_000}  # split.jsonl.gz (0.24 MB) splits, stream.jsonl.gz (0.77) does not


def test_partner_windows_are_real_documents_of_every_reachable_input(mixed_inputs):
    cfg = InputConfig(paths=[str(mixed_inputs)], **MIXED_INPUT)
    files, _ = resolve_inputs(cfg.paths)
    jobs = plan_jobs(files, cfg, unit_bytes=32 * 1024, min_docs=2)
    assert {j.kind for j in jobs} == {"files", "range", "parquet", "stream"}
    index = PartnerIndex(jobs, files, cfg)
    stream = next(j for j in jobs if j.kind == "stream")
    assert files[stream.files[0]].path.endswith("stream.jsonl.gz") and index.unreachable_bytes == stream.size
    # Every document, as the sharder's own reading sees it: (file, offset) -> text.
    truth = {}
    for i, f in enumerate(files):
        for doc in read_file(f, cfg, ReadStats()):
            truth[(i, doc.offset)] = doc.text
    rng = random.Random(0)
    seen_files, excerpts, whole = set(), 0, 0
    for _ in range(40):
        for p in index.pool(rng, windows=4, window_bytes=4096):
            text = truth[(p.file, p.offset)]  # a real document, named as the sharder names it
            assert p.text in text and len(p.text) <= max(4096, len(text))
            if p.text == text:
                whole += 1
                assert not p.cut_head and not p.cut_tail
            else:
                excerpts += 1
                assert p.cut_head == (not text.startswith(p.text)) and p.cut_tail == (not text.endswith(p.text))
            seen_files.add(Path(files[p.file].path).name)
    assert {"big.jsonl", "split.jsonl.gz", "rows.parquet"} <= seen_files and "stream.jsonl.gz" not in seen_files
    assert len([n for n in seen_files if n.startswith("doc")]) >= 5
    assert excerpts > 50  # the speeches are longer than a window: most windows are excerpts


def test_blank_line_text_is_reached_by_seeking(tmp_path):
    texts = demo_documents()[:30]
    (tmp_path / "speeches.txt").write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts), encoding="utf-8")
    cfg = InputConfig(paths=[str(tmp_path)], txt_documents="blank_lines")
    files, _ = resolve_inputs(cfg.paths)
    jobs = plan_jobs(files, cfg, unit_bytes=64 * 1024, min_docs=2)
    assert [j.kind for j in jobs] == ["stream"]
    truth = {d.offset: d.text for d in read_file(files[0], cfg, ReadStats())}
    index = PartnerIndex(jobs, files, cfg)
    assert index.unreachable_bytes == 0
    offsets = set()
    for p in index.pool(random.Random(1), windows=30, window_bytes=2048):
        assert p.text in truth[p.offset]
        offsets.add(p.offset)
    assert len(offsets) > 15


# -- the shards ---------------------------------------------------------------------------------------------------


def _shard(out: Path, tokenizer: Path, inputs: Path, **overrides) -> dict:
    values = {
        "input.paths": [str(inputs)],
        **{f"input.{k}": v for k, v in MIXED_INPUT.items()},
        "data.tokenizer": str(tokenizer),
        "output.dir": str(out),
        "data.unit_bytes": 48 * 1024,
        "output.samples_per_shard": 700,
        **overrides,
    }
    return run_sharding(build_config(ShardJobConfig, None, values))


def _digest(directory: Path) -> dict[str, str]:
    names = [*sorted(p.name for p in directory.glob("*.tar")), "manifest.json"]
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in names}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _sources(directory: Path, tok: Tokenizer, docs: list[str], limit: int):
    """(A's document, B's document, is_random_next) of the first samples, found by searching the decoded text."""
    corpus = "\n".join(docs)
    starts = np.cumsum([0] + [len(d) + 1 for d in docs])
    manifest = json.loads((directory / "manifest.json").read_text())
    urls = [str(directory / s["name"]) for s in manifest["shards"]]
    for n, sample in enumerate(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None)):
        if n >= limit:
            return
        rec = parse_bert(sample, SPECIAL_IDS.sep)
        ids = rec["input_ids"].astype(np.int64)
        found = []
        for tokens in (ids[1 : 1 + rec["len_a"]], ids[2 + rec["len_a"] : -1]):
            text = _norm(tok.decode(tokens.tolist()))
            at = corpus.find(text)
            assert at >= 0, f"not text of the corpus: {text[:80]!r}"
            # A short segment ("Thank you.") may occur in several documents: only long ones say where from.
            found.append(int(np.searchsorted(starts, at, side="right")) - 1 if len(text) >= 80 else None)
        if None not in found:
            yield found[0], found[1], rec["is_random_next"]


def test_corpus_scope_is_identical_for_any_workers_and_tasks_and_draws_from_afar(
    tmp_path, small_tokenizer, mixed_inputs
):
    one = tmp_path / "one"
    report = _shard(one, small_tokenizer, mixed_inputs)
    assert report["random_next_scope"] == "corpus"
    two = tmp_path / "two"
    _shard(two, small_tokenizer, mixed_inputs, **{"run.workers": 2})
    split = tmp_path / "split"
    for task in range(3):
        _shard(split, small_tokenizer, mixed_inputs, **{"run.num_tasks": 3, "run.task_index": task})
    merge_parts(split)
    assert _digest(one) == _digest(two) == _digest(split)

    unit = tmp_path / "unit"
    _shard(unit, small_tokenizer, mixed_inputs, **{"data.random_next_scope": "unit"})
    corpus_stats = json.loads((one / "manifest.json").read_text())["stats"]
    unit_stats = json.loads((unit / "manifest.json").read_text())["stats"]
    # (A unit of one document, here a range holding one long speech, can only draw from that document.)
    assert (
        unit_stats["random_next_same_unit"] + unit_stats.get("random_next_same_document", 0)
        == unit_stats["random_next"]
    )
    assert corpus_stats["random_next_other_file"] > 0.6 * corpus_stats["random_next"]
    assert corpus_stats["random_next_same_unit"] < 0.2 * corpus_stats["random_next"]

    # Read back: NotNext B is text of another document; in corpus scope it lies far from A (another file,
    # 20 documents or more away in the input order) far more often than in unit scope.
    tok = Tokenizer(small_tokenizer)
    files, _ = resolve_inputs([str(mixed_inputs)])
    cfg = InputConfig(**MIXED_INPUT)
    docs = [_norm(tok.decode(tok.encode([d.text])[0])) for f in files for d in read_file(f, cfg, ReadStats())]
    far = {}
    for name, directory in (("corpus", one), ("unit", unit)):
        distances = []
        for doc_a, doc_b, is_random_next in _sources(directory, tok, docs, 500):
            if is_random_next:
                assert doc_b != doc_a
                distances.append(abs(doc_b - doc_a))
            else:
                assert doc_b == doc_a
        far[name] = np.mean(np.array(distances) >= 20)
    assert far["corpus"] > 0.5 and far["unit"] < 0.1, far
    out = run_cli("inspect", str(one)).stdout
    assert "NotNext partners: " in out and "other file" in out and "(random_next_scope corpus)" in out


def test_unreachable_inputs_are_reported_and_units_fall_back_to_themselves(tmp_path, small_tokenizer):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "all.jsonl.gz").write_bytes(gzip.compress(_jsonl(demo_documents()[:20])))
    proc = run_cli(
        "shard", "--input", str(tmp_path / "in"), "--tokenizer", str(small_tokenizer), "--output",
        str(tmp_path / "out"), "--input.gzip_split_max_bytes", "1024", "--data.unit_bytes", str(128 * 1024),
    )  # fmt: skip
    assert "cannot be reached at random places" in proc.stderr and "every unit draws from its own" in proc.stderr
    stats = json.loads((tmp_path / "out" / "manifest.json").read_text())["stats"]
    assert stats["random_next_fallback_units"] >= 2 and stats["random_next_same_unit"] == stats["random_next"]
    assert "units that drew NotNext from their own documents" in proc.stdout


# -- single-sentence documents ------------------------------------------------------------------------------------


def _synthetic_documents():
    """Token = doc * 100_000 + sentence * 100 + position; documents 0, 5, 10 ... hold one sentence."""
    gen = random.Random(3)
    docs = []
    for d in range(40):
        num = 1 if d % 5 == 0 else gen.randint(2, 12)
        docs.append([[d * 100_000 + s * 100 + k for k in range(gen.randint(4, 30))] for s in range(num)])
    return docs


def test_single_sentence_documents_pair_as_google_or_serve_only_as_partners():
    docs = _synthetic_documents()
    singles = {d for d, doc in enumerate(docs) if len(doc) == 1}
    tokens = UnitTokens.from_documents(docs)
    flat = tokens.flat.tolist()
    for mode in ("random_next_only", "notnext_pair"):
        stats: dict = {}
        pairs, order = create_unit_pairs(tokens, 64, 0.1, 0.5, 2, random.Random(7), stats, single_sentence=mode)
        from_singles = [i for i in range(len(pairs)) if order[pairs.doc[i]] in singles]
        partners = {order[pairs.random_doc[i]] for i in range(len(pairs)) if pairs.is_random_next[i]}
        assert partners & singles  # partner material either way
        if mode == "random_next_only":
            assert not from_singles and "single_sentence_pairs" not in stats
            continue
        # Each single-sentence document is segment A once per pass, always with a random-next B.
        assert len(from_singles) == 2 * len(singles) == stats["single_sentence_pairs"]
        for i in from_singles:
            assert pairs.is_random_next[i]
            sentence = docs[order[pairs.doc[i]]][0]  # A: the sentence, perhaps trimmed at either end
            tokens_a = flat[pairs.a_start[i] : pairs.a_end[i]]
            start = sentence.index(tokens_a[0])
            assert tokens_a == sentence[start : start + len(tokens_a)]
            tokens_b = flat[pairs.b_start[i] : pairs.b_end[i]]
            assert {t // 100_000 for t in tokens_b} == {order[pairs.random_doc[i]]} != {order[pairs.doc[i]]}


def test_a_pool_excerpt_of_a_document_is_never_its_own_partner():
    docs = _synthetic_documents()[:6]
    # The pool: an excerpt of unit document 1 (its sentences 1..) and one document from another file.
    tokens = UnitTokens.from_documents([*docs, docs[1][1:], [[9_900_000 + k for k in range(20)]]])
    first = tokens.doc_sentences[6]
    tokens.doc_sentences = tokens.doc_sentences[:7]
    pool = RandomNextPool(
        [first, first + len(docs[1]) - 1], [first + len(docs[1]) - 1, first + len(docs[1])], [1, -1], [0, 1]
    )
    stats: dict = {}
    pairs, order = create_unit_pairs(tokens, 64, 0.0, 1.0, 3, random.Random(2), stats, pool=pool, files=[0] * 6)
    for i in range(len(pairs)):
        if order[pairs.doc[i]] == 1:
            assert pairs.random_doc[i] == 1
    assert stats["random_next_same_unit"] > 0 and stats["random_next_other_file"] > 0
    assert "random_next_same_document" not in stats


def test_single_sentence_option_on_a_corpus_of_short_documents(tmp_path, small_tokenizer):
    # Short reviews, one sentence each, plus a few longer documents: the shape of a task-adaptive corpus.
    splitter = RuleSplitter()
    short = [s for t in demo_documents()[:3] for s in splitter.split(t) if len(s) > 40][:400]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "reviews.jsonl").write_bytes(_jsonl(short + demo_documents()[3:6]))
    counts = {}
    for mode in ("random_next_only", "notnext_pair"):
        out = tmp_path / mode
        proc = run_cli("shard", "--input", str(tmp_path / "in"), "--tokenizer", str(small_tokenizer), "--output",
                       str(out), "--data.single_sentence_documents", mode)  # fmt: skip
        stats = json.loads((out / "manifest.json").read_text())["stats"]
        counts[mode] = stats
        assert stats["single_sentence_documents"] >= 395
        if mode == "notnext_pair":
            assert stats["single_sentence_pairs"] == stats["single_sentence_documents"]
            assert "segment A of" in proc.stdout and "NotNext pairs" in proc.stdout
        else:
            assert "random-next material only" in proc.stdout
    gained = counts["notnext_pair"]["samples"] - counts["random_next_only"]["samples"]
    assert gained >= 0.9 * counts["notnext_pair"]["single_sentence_pairs"]
    assert counts["notnext_pair"]["random_next"] - counts["random_next_only"]["random_next"] >= 0.9 * gained
    help_text = run_cli("shard", "--help").stdout
    assert "--data.single_sentence_documents" in help_text and "--data.random_next_scope" in help_text
