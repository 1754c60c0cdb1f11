"""The shard set a training run reads: the manifest, the shards that passed the start-up check, and the
check that the training tokenizer is the one the shards were written with.

Every rank must plan its epochs over the same list of shards, or the ranks' slices overlap and their batch
counts differ. The check below is a pure function of the manifest and the files, so ranks that share a file
system reach the same list; a trainer that prefers to check once can run :func:`open_shard_set` on rank 0 and
broadcast the (picklable) result to the others.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.preprocess.manifest import FORMAT, load_manifest
from pipeline.preprocess.samples import MLM_FIELD
from pipeline.tokenizer.spm import Tokenizer, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    name: str
    path: str
    num_samples: int


@dataclass
class ShardSet:
    """What the loader needs from a shard directory, after the start-up check."""

    directory: str
    objective: str  # "bert" or "gpt"
    seq_len: int
    vocab_size: int
    special_ids: dict[str, int]
    tokenizer_sha256: str
    tokenizer_path: str  # where the tokenizer was when the shards were written
    static_masks: bool  # BERT shards written with baked-in masks (mlm.npy)
    mean_tokens_per_sample: float
    shards: list[Shard]  # readable, non-empty shards in manifest order
    bad: list[tuple[str, str]] = field(default_factory=list)  # (shard name, reason) excluded at start

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def fingerprint(self) -> str:
        """Identifies the list the epoch plans are built from (stored with the loader position)."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}:{s.num_samples}\n".encode())
        return h.hexdigest()[:16]


def _problem(path: Path, entry: dict, verify: str) -> str | None:
    """Why a shard cannot be used, or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if verify in ("size", "sha256") and size != entry["bytes"]:
        return f"size {size} != {entry['bytes']} in the manifest (truncated or replaced)"
    if verify == "sha256":
        try:
            if sha256_file(path) != entry["sha256"]:
                return "sha256 differs from the manifest"
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
    return None


def open_shard_set(directory: str | Path, verify: str = "size", on_bad: str = "skip") -> ShardSet:
    """Load the manifest and check its shards (``verify``: none, size or sha256).

    Bad shards are excluded with a warning, or raise ``UserError`` with ``on_bad="fail"``. Hashing runs on a
    few threads (hashlib releases the GIL), which matters for the sha256 check of a large corpus.
    """
    if not str(directory):
        raise UserError("data.shards: no shard directory given (the directory with manifest.json)")
    directory = Path(directory)
    manifest = load_manifest(directory)
    if manifest.get("format") != FORMAT:
        raise UserError(f"{directory}/manifest.json has format {manifest.get('format')!r}, expected {FORMAT!r}")
    entries = manifest["shards"]
    workers = min(8, os.cpu_count() or 1) if verify == "sha256" else 1
    with ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(lambda e: _problem(directory / e["name"], e, verify), entries))
    bad = [(e["name"], p) for e, p in zip(entries, problems, strict=True) if p is not None]
    if bad:
        shown = "; ".join(f"{name}: {why}" for name, why in bad[:10]) + (" ..." if len(bad) > 10 else "")
        lost = sum(e["samples"] for e, p in zip(entries, problems, strict=True) if p is not None)
        message = f"{directory}: {len(bad)} of {len(entries)} shards are unusable ({lost} samples): {shown}"
        if on_bad == "fail":
            raise UserError(message + " (data.on_bad_shard=fail)")
        log.warning("%s; training without them", message)
    shards = [
        Shard(e["name"], str(directory / e["name"]), int(e["samples"]))
        for e, p in zip(entries, problems, strict=True)
        if p is None and e["samples"] > 0
    ]
    if not shards:
        raise UserError(f"{directory}: no usable shards (of {len(entries)} listed in the manifest)")
    totals = manifest.get("totals", {})
    tok = manifest["tokenizer"]
    return ShardSet(
        directory=str(directory),
        objective=manifest["objective"],
        seq_len=int(manifest["seq_len"]),
        vocab_size=int(tok["vocab_size"]),
        special_ids=dict(tok["special_ids"]),
        tokenizer_sha256=tok["sha256"],
        tokenizer_path=str(tok.get("path", "")),
        static_masks=MLM_FIELD in manifest.get("sample_fields", []),
        mean_tokens_per_sample=totals.get("tokens", 0) / max(1, totals.get("samples", 0)),
        shards=shards,
        bad=bad,
    )


def check_tokenizer(shard_set: ShardSet, tokenizer: Tokenizer | str | Path) -> Tokenizer:
    """The tokenizer given to training must be the one the shards were written with; raise ``UserError`` if not.

    Ids from another tokenizer would train silently on garbage (same vocabulary size, different pieces), so
    this compares the SentencePiece model's sha256 recorded in the manifest, not just the size.
    """
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    if tokenizer.sha256 != shard_set.tokenizer_sha256:
        raise UserError(
            f"tokenizer {tokenizer.directory} (sha256 {tokenizer.sha256[:12]}, vocab {tokenizer.vocab_size}) is "
            f"not the one the shards in {shard_set.directory} were written with (sha256 "
            f"{shard_set.tokenizer_sha256[:12]}, vocab {shard_set.vocab_size}, see manifest.json 'tokenizer'): "
            "train with that tokenizer or re-shard the corpus with this one"
        )
    return tokenizer
