"""Train a SentencePiece model on the sharder's own readers and sentence splitter.

Sentences are sampled uniformly with a seeded reservoir (at most ``max_sentences``), so memory stays bounded on
big corpora and the same inputs and seed give the same sample. SentencePiece itself is seeded too, so the same
sample gives the same model (the model's sha256 is recorded and checked downstream).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import option, save_config, section, to_dict
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.text.readers import InputConfig, ReadStats, read_file, resolve_inputs
from pipeline.text.sentences import SentenceConfig, build_splitter
from pipeline.tokenizer.special import SPECIAL_IDS, SPECIAL_TOKENS
from pipeline.tokenizer.spm import META_FILE, MODEL_FILE, VOCAB_FILE, check_special_pieces, sha256_file

log = logging.getLogger(__name__)


@dataclass
class TokenizerTrainConfig:
    """SentencePiece training settings."""

    vocab_size: int = option(8000, "vocabulary size, special and byte pieces included", aliases=("--vocab-size",))
    model_type: Literal["unigram", "bpe"] = option("unigram", "SentencePiece algorithm", aliases=("--model-type",))
    max_sentences: int = option(2_000_000, "train on a seeded uniform sample of at most this many sentences")
    character_coverage: float = option(0.9999, "share of characters covered by pieces; the rest use byte fallback")
    byte_fallback: bool = option(True, "encode characters outside the vocabulary as UTF-8 byte pieces, never [UNK]")
    split_digits: bool = option(True, "split numbers into single digits")
    seed: int = option(12345, "seed of the sentence sample and of SentencePiece", aliases=("--seed",))
    num_threads: int = option(0, "SentencePiece trainer threads (0: all cores)")

    def __post_init__(self) -> None:
        minimum = len(SPECIAL_TOKENS) + (256 if self.byte_fallback else 0) + 16
        if self.vocab_size < minimum:
            raise ValueError(
                f"tokenizer.vocab_size must be >= {minimum} (specials + byte pieces), got {self.vocab_size}"
            )
        if self.max_sentences < 1:
            raise ValueError("tokenizer.max_sentences must be >= 1")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError("tokenizer.character_coverage must be in [0.9, 1.0]")


@dataclass
class TokenizerJobConfig:
    """`python -m pipeline tokenizer`: inputs, sentence splitting, training settings, output."""

    input: InputConfig = section(InputConfig)
    sentences: SentenceConfig = section(SentenceConfig)
    tokenizer: TokenizerTrainConfig = section(TokenizerTrainConfig)
    output: str = option(
        "", "output directory for spm.model, spm.vocab and tokenizer_meta.json", aliases=("--output",), path=True
    )
    overwrite: bool = option(False, "replace an existing tokenizer in the output directory", aliases=("--overwrite",))

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output: an output directory is required (--output DIR)")


def sample_sentences(cfg: TokenizerJobConfig) -> tuple[list[str], dict]:
    """Read every input, split into sentences, keep a seeded reservoir sample. Returns (sample, report)."""
    files, ignored = resolve_inputs(cfg.input.paths)
    splitter = build_splitter(cfg.sentences)
    stats = ReadStats()
    rng = random.Random(cfg.tokenizer.seed)
    reservoir: list[str] = []
    limit = cfg.tokenizer.max_sentences
    seen = 0
    total_bytes = sum(f.size for f in files)
    with progress_bar(total=total_bytes, desc="reading", unit="B", unit_scale=True) as bar:
        for f in files:
            for doc in read_file(f, cfg.input, stats):
                for sentence in splitter.split(doc.text):
                    seen += 1
                    if len(reservoir) < limit:
                        reservoir.append(sentence)
                    else:  # Algorithm R: keep each sentence with probability limit / seen
                        j = rng.randrange(seen)
                        if j < limit:
                            reservoir[j] = sentence
            bar.update(f.size)
            bar.set_postfix(docs=stats.counts["documents"], sentences=seen, refresh=False)
    report = {
        "files": len(files),
        "ignored_paths": {"count": len(ignored), "first": [{"path": p, "reason": r} for p, r in ignored[:20]]},
        "read": stats.to_json(),
        "sentences_seen": seen,
        "sentences_sampled": len(reservoir),
        "long_sentences_cut": getattr(splitter, "num_long_cuts", 0),
    }
    return reservoir, report


def train_tokenizer(cfg: TokenizerJobConfig) -> dict:
    import sentencepiece as spm

    out = Path(cfg.output)
    if (out / MODEL_FILE).exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds a tokenizer; pass --overwrite to replace it")
    t0 = time.time()
    sentences, report = sample_sentences(cfg)
    if not sentences:
        raise UserError("the inputs hold no sentences to train on (see the read report above)")
    tcfg = cfg.tokenizer
    spm.set_random_generator_seed(tcfg.seed)
    # The model is written to memory (model_writer) rather than to a model_prefix path, because SentencePiece
    # stores the prefix inside the model: the same sample would give a different sha256 in another directory.
    # Files are written under temporary names and renamed at the end, so an interrupted run never leaves a
    # model whose meta file is missing or stale.
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out))
    model_bytes = io.BytesIO()
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model_bytes,
                vocab_size=tcfg.vocab_size,
                model_type=tcfg.model_type,
                character_coverage=tcfg.character_coverage,
                byte_fallback=tcfg.byte_fallback,
                split_digits=tcfg.split_digits,
                pad_id=SPECIAL_IDS.pad,
                unk_id=SPECIAL_IDS.unk,
                bos_id=-1,
                eos_id=-1,
                pad_piece="[PAD]",
                unk_piece="[UNK]",
                control_symbols=list(SPECIAL_TOKENS[2:]),  # ids 2.. in this order
                input_sentence_size=0,  # we already sampled
                max_sentence_length=4 * cfg.sentences.max_chars + 16,  # bytes; our splitter caps chars
                num_threads=tcfg.num_threads or os.cpu_count() or 1,
                train_extremely_large_corpus=len(sentences) > 10_000_000,
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise UserError(f"SentencePiece training failed: {exc}") from None
        (tmp / MODEL_FILE).write_bytes(model_bytes.getvalue())
        sp = spm.SentencePieceProcessor(model_file=str(tmp / MODEL_FILE))
        check_special_pieces(sp)
        with (tmp / VOCAB_FILE).open("w", encoding="utf-8") as fh:
            for i in range(sp.get_piece_size()):
                fh.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
        sha = sha256_file(tmp / MODEL_FILE)
        meta = {
            "format": "pipeline-tokenizer/1",
            "model_file": MODEL_FILE,
            "sha256": sha,
            "vocab_size": sp.get_piece_size(),
            "model_type": tcfg.model_type,
            "special_ids": SPECIAL_IDS.as_dict(),
            "special_tokens": list(SPECIAL_TOKENS),
            "settings": to_dict(tcfg),
            "sentences": to_dict(cfg.sentences),
            "report": report,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name in (MODEL_FILE, VOCAB_FILE, META_FILE):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save_config(cfg, out / "config.yaml")
    meta["seconds"] = round(time.time() - t0, 2)
    return meta
