"""Configuration of `python -m pipeline shard`.

Only ``input``, ``sentences`` and ``data`` (and ``output.samples_per_shard``) decide what the shards contain;
``run`` (workers, tasks) never does, which is what makes the output byte-identical for any worker count and
any task split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pipeline.config import option, section, to_dict
from pipeline.errors import UserError
from pipeline.text.readers import InputConfig
from pipeline.text.sentences import SentenceConfig


@dataclass
class ShardDataConfig:
    """What a sample is: objective, length, pair-creation and masking settings, work-unit size."""

    objective: Literal["bert", "gpt"] = option(
        "bert", "bert: sentence pairs with NSP labels; gpt: packed token blocks", aliases=("--objective",)
    )
    tokenizer: str = option(
        "", "tokenizer directory (from `python -m pipeline tokenizer`)", aliases=("--tokenizer",), path=True
    )
    seq_len: int = option(128, "maximum tokens per sample, special tokens included", aliases=("--seq-len",))
    seed: int = option(12345, "seed of every random choice (per work unit)", aliases=("--seed",))
    short_seq_prob: float = option(0.1, "BERT: probability of a shorter target length for a document's chunks")
    random_next_prob: float = option(0.5, "BERT: probability that segment B comes from a random other document")
    random_next_scope: Literal["corpus", "unit"] = option(
        "corpus",
        "BERT: where NotNext segments come from: corpus (documents from seeded places anywhere in the input, as"
        " Google's recipe draws from all documents) or unit (the unit's own, neighbouring documents)",
    )
    random_next_windows: int = option(
        16, "BERT, corpus scope: places in the input (seeded per unit) whose documents a unit draws NotNext from"
    )
    random_next_window_bytes: int = option(
        8192, "BERT, corpus scope: text read at each place (whole documents; a longer one gives an excerpt)"
    )
    single_sentence_documents: Literal["random_next_only", "notnext_pair"] = option(
        "random_next_only",
        "BERT: a one-sentence document is only NotNext material (random_next_only), or also segment A of a pair"
        " whose B is random-next text, always NotNext (notnext_pair: Google's create_pretraining_data.py)",
    )
    dupe_factor: int = option(1, "BERT: passes over each unit's documents, each with different random choices")
    static_masking: bool = option(False, "BERT: bake masks into the shards (the original recipe) instead of dynamic")
    masked_lm_prob: float = option(0.15, "BERT static masking: share of tokens to predict")
    max_predictions_per_seq: int = option(20, "BERT static masking: cap on predicted tokens per sample")
    whole_word_mask: bool = option(False, "BERT static masking: mask all pieces of a word together")
    unit_bytes: int = option(1 << 20, "text bytes per work unit (bounds memory; changes the output)")
    min_docs_per_unit: int = option(8, "a unit closes only once it holds this many documents (random-next pool)")

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"data.seq_len must be >= 8, got {self.seq_len}")
        for name in ("short_seq_prob", "random_next_prob", "masked_lm_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{name} must be within [0, 1], got {value}")
        if self.random_next_windows < 1:
            raise ValueError("data.random_next_windows must be >= 1")
        if self.random_next_window_bytes < 256:
            raise ValueError("data.random_next_window_bytes must be >= 256")
        if self.dupe_factor < 1:
            raise ValueError("data.dupe_factor must be >= 1")
        if self.unit_bytes < 1024:
            raise ValueError("data.unit_bytes must be >= 1024")
        if self.min_docs_per_unit < 2:
            raise ValueError("data.min_docs_per_unit must be >= 2 (BERT needs other documents for random-next)")
        if self.static_masking and self.objective != "bert":
            raise ValueError("data.static_masking applies to objective bert only")


@dataclass
class ShardOutputConfig:
    """Where shards go and how big they are."""

    dir: str = option("", "output directory for shards and manifest.json", aliases=("--output",), path=True)
    samples_per_shard: int = option(10000, "maximum samples per .tar shard (a unit's samples may span shards)")
    overwrite: bool = option(
        False, "replace output written with a different config (otherwise refused)", aliases=("--overwrite",)
    )

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("output.dir: an output directory is required (--output DIR)")
        if self.samples_per_shard < 1:
            raise ValueError("output.samples_per_shard must be >= 1")


@dataclass
class ShardRunConfig:
    """How the work is executed; never changes the output."""

    workers: int = option(1, "worker processes on this machine (0: one per core)", aliases=("--workers",))
    num_tasks: int | None = option(
        None,
        "split the work units over this many tasks (default: SLURM_ARRAY_TASK_COUNT or 1)",
        aliases=("--num-tasks",),
    )
    task_index: int | None = option(
        None, "this task's index in [0, num_tasks) (default: from SLURM_ARRAY_TASK_ID or 0)", aliases=("--task-index",)
    )
    verify_existing: bool = option(True, "on resume, re-hash completed shards before keeping them")

    def resolved_tasks(self) -> tuple[int, int]:
        """(num_tasks, task_index), taken from a SLURM array job when not given."""
        num, index = self.num_tasks, self.task_index
        env = os.environ
        if num is None and "SLURM_ARRAY_TASK_COUNT" in env:
            num = int(env["SLURM_ARRAY_TASK_COUNT"])
            lo, hi = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_MAX", num - 1))
            if hi - lo + 1 != num:
                raise UserError(
                    f"SLURM array {lo}-{hi} has {num} tasks but is not contiguous (a step?): "
                    "pass --num-tasks and --task-index explicitly"
                )
            if index is None:
                index = int(env["SLURM_ARRAY_TASK_ID"]) - lo
        num = 1 if num is None else num
        index = 0 if index is None else index
        if num < 1 or not 0 <= index < num:
            raise UserError(f"--task-index {index} is not within [0, --num-tasks {num})")
        return num, index

    def resolved_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)


@dataclass
class ShardJobConfig:
    """`python -m pipeline shard`."""

    input: InputConfig = section(InputConfig)
    sentences: SentenceConfig = section(SentenceConfig)
    data: ShardDataConfig = section(ShardDataConfig)
    output: ShardOutputConfig = section(ShardOutputConfig)
    run: ShardRunConfig = section(ShardRunConfig)

    def __post_init__(self) -> None:
        if not self.data.tokenizer:
            raise ValueError("data.tokenizer: a tokenizer directory is required (--tokenizer DIR)")

    def content_config(self) -> dict:
        """The settings that decide the shards' bytes (what the manifest records and resume compares)."""
        full = to_dict(self)
        return {
            "input": {k: v for k, v in full["input"].items() if k != "paths"},
            "sentences": full["sentences"],
            "data": {k: v for k, v in full["data"].items() if k != "tokenizer"},
            "output": {"samples_per_shard": self.output.samples_per_shard},
        }
