"""Configuration of the pre-training data loader (the trainer's ``data`` section).

What belongs to the trainer stays out: the micro-batch size, the rank and world size and the seed are passed
to :class:`~pipeline.data.loader.PretrainLoader` explicitly, because the trainer derives them from its own
settings and the launcher's environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import option


@dataclass
class DataConfig:
    """Pre-training data: shards, reader processes, shuffling, dynamic masking, padding and bad shards."""

    shards: str = option("", "shard directory with manifest.json (from `python -m pipeline shard`)", path=True)
    num_workers: int = option(2, "DataLoader worker processes per rank (0: read in the training process)")
    prefetch_factor: int = option(4, "batches each worker prepares ahead of the training step")
    shuffle_window: int = option(
        10000,
        "samples shuffled together: each worker reads its slice of the epoch in windows of this many samples "
        "and yields each window in a seeded random order (memory per worker ~ window x sample size)",
    )
    mask_prob: float = option(0.15, "BERT dynamic masking: share of the non-special tokens to predict")
    mask_replace_prob: float = option(0.8, "BERT: share of the predicted tokens replaced by [MASK]")
    random_replace_prob: float = option(0.1, "BERT: share replaced by a random non-special token (rest unchanged)")
    max_predictions_per_seq: int = option(20, "BERT: cap on predicted tokens per sequence (20 for 128, 80 for 512)")
    whole_word_mask: bool = option(False, "BERT: mask all pieces of a word together (SentencePiece word starts)")
    pad_to: Literal["seq_len", "batch"] = option(
        "seq_len",
        "BERT: pad every batch to the manifest's seq_len (fixed shapes: CUDA graphs, torch.compile) or to the "
        "longest sample of the batch rounded up to a multiple of 8",
    )
    packing: bool = option(
        False,
        "BERT: lay each micro-batch's pairs into as few rows of seq_len as fit them (first-fit decreasing), "
        "attention kept within each pair; the micro-batch still counts pairs, so the recipe is unchanged and "
        "only the rows computed shrink (worth it when pairs are much shorter than seq_len: README)",
    )
    verify_shards: Literal["none", "size", "sha256"] = option(
        "size", "check at start that every shard exists with the manifest's size (sha256: also re-hash it)"
    )
    on_bad_shard: Literal["skip", "fail"] = option(
        "skip",
        "a missing or corrupt shard: skip it and count (samples lost while reading are replaced so that every "
        "rank keeps the same batch count), or stop with an error",
    )

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.shuffle_window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1, got {self.shuffle_window}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"data.mask_prob must be within (0, 1], got {self.mask_prob}")
        for name in ("mask_replace_prob", "random_replace_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{name} must be within [0, 1], got {value}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError(
                "data.random_replace_prob: mask_replace_prob + random_replace_prob must be <= 1, got "
                f"{self.mask_replace_prob} + {self.random_replace_prob}"
            )
        if self.max_predictions_per_seq < 1:
            raise ValueError(f"data.max_predictions_per_seq must be >= 1, got {self.max_predictions_per_seq}")
