"""End to end on the real corpus: all 233 State of the Union addresses from ../shared/data."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import webdataset as wds
from conftest import run_cli

from pipeline.preprocess.samples import parse_bert
from pipeline.tokenizer.special import SPECIAL_IDS
from pipeline.tokenizer.spm import Tokenizer


@pytest.fixture(scope="module")
def sotu_run(tmp_path_factory, sotu_dir):
    root = tmp_path_factory.mktemp("sotu-run")
    run_cli("tokenizer", "--input", str(sotu_dir), "--vocab-size", "8000", "--output", str(root / "tok"))
    run_cli("shard", "--input", f"{sotu_dir}/*.txt", "--tokenizer", str(root / "tok"), "--output", str(root / "bert"),
            "--objective", "bert", "--seq-len", "256", "--workers", "2")  # fmt: skip
    return root


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_sotu_bert_pairs_are_real_continuations(sotu_run, sotu_dir):
    tok = Tokenizer(sotu_run / "tok")
    manifest = json.loads((sotu_run / "bert" / "manifest.json").read_text())
    assert manifest["stats"]["read"]["counts"]["documents"] == 233
    assert len(manifest["inputs"]) == 233 and all(i["sha256"] for i in manifest["inputs"])
    # The source text as SentencePiece normalises it, so decoded segments can be found in it.
    docs = [_norm(tok.decode(tok.encode([p.read_text()])[0])) for p in sorted(sotu_dir.glob("*.txt"))]
    corpus = "\n".join(docs)
    urls = [str(sotu_run / "bert" / s["name"]) for s in manifest["shards"]]
    is_next, untruncated, not_next, not_adjacent = 0, 0, 0, 0
    for n, sample in enumerate(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None)):
        if n >= 400:
            break
        rec = parse_bert(sample, SPECIAL_IDS.sep)
        ids = rec["input_ids"].astype(np.int64)
        text_a = _norm(tok.decode(ids[1 : 1 + rec["len_a"]].tolist()))
        text_b = _norm(tok.decode(ids[2 + rec["len_a"] : -1].tolist()))
        at = corpus.find(text_a)
        assert at >= 0, "segment A must be text of the corpus"
        assert corpus.find(text_b) >= 0, "segment B must be text of the corpus"
        doc_end = corpus.find("\n", at)
        b_after = corpus.find(text_b, at + len(text_a), doc_end if doc_end >= 0 else None)
        if rec["is_random_next"]:
            not_next += 1
            not_adjacent += corpus[at + len(text_a) : at + len(text_a) + 1 + len(text_b)].strip() != text_b
        else:
            is_next += 1
            assert b_after >= 0, f"IsNext B must follow A in A's document: {text_a[-60:]!r} / {text_b[:60]!r}"
            gap = b_after - (at + len(text_a))
            # Truncation (to seq_len - 3 tokens) may trim the seam; at most the sentence that overflowed.
            assert gap <= 1200, gap
            if len(ids) < 256:  # not truncated at all: B starts right after A
                untruncated += 1
                assert gap <= 1, (text_a[-80:], text_b[:80])
    assert is_next > 100 and not_next > 100
    assert untruncated > 10
    assert not_adjacent / not_next > 0.95


def test_sotu_nsp_balance_and_report(sotu_run):
    out = run_cli("inspect", str(sotu_run / "bert"), "--verify").stdout
    manifest = json.loads((sotu_run / "bert" / "manifest.json").read_text())
    share = manifest["stats"]["random_next"] / manifest["totals"]["samples"]
    assert 0.45 < share < 0.6  # 50% by design, plus chunks of one sentence that can only be NotNext
    assert manifest["stats"]["sentences"] > 60000 and manifest["totals"]["tokens"] > 2_000_000
    assert max(i for i, c in enumerate(manifest["stats"]["length_histogram"]) if c) <= 256
    assert "verify: all" in out
