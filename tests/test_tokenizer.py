"""Tokenizer training: fixed special ids, byte fallback, determinism, outputs and refusals."""

from __future__ import annotations

import json

from conftest import DEMO_CORPUS, run_cli

from pipeline.tokenizer.special import SPECIAL_IDS, SPECIAL_TOKENS
from pipeline.tokenizer.spm import Tokenizer


def test_special_ids_outputs_and_byte_fallback(small_tokenizer):
    tok = Tokenizer(small_tokenizer)
    for token, expected in SPECIAL_IDS.by_token().items():
        assert tok.sp.piece_to_id(token) == expected
    meta = json.loads((small_tokenizer / "tokenizer_meta.json").read_text())
    assert meta["special_ids"] == SPECIAL_IDS.as_dict() and meta["sha256"] == tok.sha256
    assert (small_tokenizer / "spm.vocab").read_text().splitlines()[4].startswith("[MASK]\t")
    assert (small_tokenizer / "config.yaml").is_file()
    # Byte fallback: characters never seen in training become byte pieces, not [UNK].
    ids = tok.encode(["naïve 東京 🚀"])[0]
    assert SPECIAL_IDS.unk not in ids
    assert tok.decode(ids) == "naïve 東京 🚀"
    # Text that spells a special token is ordinary text: control symbols cannot be injected.
    assert not set(tok.encode(["[MASK] [CLS] [SEP]"])[0]) & set(SPECIAL_IDS.as_dict().values())
    assert tok.token_dtype.name == "uint16"
    assert tok.word_start.sum() > 100 and not tok.word_start[: len(SPECIAL_TOKENS)].any()


def test_same_inputs_give_the_same_model_anywhere(tmp_path, small_tokenizer):
    out = tmp_path / "other-place"
    run_cli("tokenizer", "--input", str(DEMO_CORPUS), "--vocab-size", "2000", "--output", str(out))
    assert Tokenizer(out).sha256 == Tokenizer(small_tokenizer).sha256


def test_bpe_option_and_sampling(tmp_path):
    out = tmp_path / "bpe"
    proc = run_cli(
        "tokenizer", "--input", str(DEMO_CORPUS), "--vocab-size", "1500", "--model-type", "bpe",
        "--tokenizer.max_sentences", "3000", "--output", str(out),
    )  # fmt: skip
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    assert meta["model_type"] == "bpe" and meta["report"]["sentences_sampled"] == 3000
    assert meta["report"]["sentences_seen"] > 30000
    assert "trained on 3000" in proc.stdout


def test_refuses_to_overwrite_and_reports_bad_inputs(tmp_path, small_tokenizer):
    proc = run_cli("tokenizer", "--input", str(DEMO_CORPUS), "--output", str(small_tokenizer), check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    proc = run_cli("tokenizer", "--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "t"), check=False)
    assert proc.returncode == 2 and "input not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(
        "tokenizer", "--input", str(DEMO_CORPUS), "--vocab-size", "100", "--output", str(tmp_path / "t"), check=False
    )
    assert proc.returncode == 2 and "vocab_size must be >=" in proc.stderr
