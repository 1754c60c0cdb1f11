"""What a training run saves and restores, in one place.

A checkpoint is DeepSpeed's engine state (weights, optimizer, loss scaler) plus what this module owns:

- ``TrainState`` (client state, written by data-parallel rank 0): step, epoch, samples and tokens consumed,
  skipped-step counts, the MLflow run id and the best evaluation score;
- per rank (``rank_NNNNN_state.pt``, beside DeepSpeed's files): the RNG states and the data position;
- the resolved config and the publication mark (``checkpoint.json``, see ``pipeline.train.checkpoint``).

``RunCheckpoints`` decides where a run resumes from (before the engine exists: another world size loads a
universal checkpoint), restores all of the above, and writes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.config import save_config, to_dict
from pipeline.train.checkpoint import Checkpointer, find_checkpoint, read_mark, set_rng_state, to_universal
from pipeline.train.config import CheckpointConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything needed to continue exactly where a run stopped (with the engine's own state)."""

    step: int = 0  # optimizer steps attempted (applied or skipped)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch, on the current layout
    # Earlier layouts of the current epoch (a resume on other ranks / workers): each a data layout with the
    # batches each of its ranks consumed ("batches"); the task reads what they had not.
    epoch_history: list[dict] = field(default_factory=list)
    samples: int = 0  # global samples consumed
    tokens: int = 0  # global tokens consumed
    skipped_nonfinite: int = 0
    skipped_overflow: int = 0
    # Damage met while reading the data, all ranks together (pre-training shards; 0 otherwise): damaged regions,
    # members that did not decode and shards that ended early; samples repeated in place of unreadable ones.
    data_read_errors: int = 0
    data_samples_substituted: int = 0
    mlflow_run_id: str | None = None
    best_metric: float | None = None


@dataclass(frozen=True)
class ResumePoint:
    """The published checkpoint a run continues from, and how it is loaded."""

    tag_dir: Path  # the published tag
    load_dir: Path  # what the engine loads: the tag, or its universal conversion
    universal: bool  # loaded through DeepSpeed's universal format (another world size, or asked for)


class RunCheckpoints:
    """Saves and restores a run: the engine's checkpoint, ``TrainState``, per-rank RNG and data position."""

    def __init__(self, out: Path, cfg: CheckpointConfig, train: TrainConfig, rank: int, world_size: int, config):
        self.cfg, self.train, self.config = cfg, train, config
        self.rank, self.world_size = rank, world_size
        self.files = Checkpointer(out, cfg.keep_last, rank, world_size)
        self.out = out

    @property
    def dir(self) -> Path:
        return self.files.dir

    def resume_point(self) -> ResumePoint | None:
        """The checkpoint to continue from (``checkpoint.resume``), converted to universal if the world changed."""
        tag_dir = find_checkpoint(self.cfg.resume, self.out)
        if tag_dir is None:
            return None
        universal = self.cfg.universal or read_mark(tag_dir)["world_size"] != self.world_size
        load_dir = to_universal(tag_dir, self.rank) if universal else tag_dir
        return ResumePoint(tag_dir, load_dir, universal)

    def restore(self, engine, point: ResumePoint, data_layout: dict) -> TrainState:
        """Load the engine's state and return the run's, with this rank's RNG and data position restored.

        ``data_layout``: what the task's data position now refers to. When it differs from the saved one
        (other ranks or loader workers), the epoch continues with what the saved layout had not consumed: the
        saved position becomes an entry of ``epoch_history`` and the new layout starts at batch 0 of the rest.
        """
        _, client = engine.load_checkpoint(str(point.load_dir.parent), tag=point.load_dir.name)
        saved = client["train_state"]
        state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
        rank_state = None if point.universal else self.files.load_rank_state(point.load_dir)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        else:  # another world size: no RNG state of this rank's to continue
            torch.manual_seed(self.train.seed + 1000 * state.step + self.rank)
        saved_layout = saved.get("data_layout")
        if saved_layout is not None and saved_layout != data_layout:
            state.epoch_history = [*state.epoch_history, {**saved_layout, "batches": state.batch_in_epoch}]
            state.batch_in_epoch = 0
            log.info("data layout changed: epoch %d continues with the samples not yet consumed", state.epoch)
        elif rank_state is not None:
            state.batch_in_epoch = rank_state["batch_in_epoch"]
        elif saved_layout is None:  # a checkpoint from before data layouts were saved: the old approximation
            state.batch_in_epoch = saved["epoch_samples"] // (self.train.micro_batch_size * self.world_size)
        log.info("resumed from %s at step %d (epoch %d)", point.tag_dir, state.step, state.epoch)
        return state

    def save(self, engine, state: TrainState, data_layout: dict, reason: str, best: bool, tracker,
             run_files: dict[str, Path] | None = None) -> Path:  # fmt: skip
        """A published checkpoint of ``state``; ``run_files``: files (name -> path, rank 0's) to publish with it."""
        client = {
            "train_state": {
                **asdict(state),
                "data_layout": data_layout,  # what batch_in_epoch (the same on every rank) counts in
                "epoch_samples": state.batch_in_epoch * self.train.micro_batch_size * self.world_size,
            },
            "config": to_dict(self.config),
        }
        rank_state = {"batch_in_epoch": state.batch_in_epoch, "epoch": state.epoch}
        mark = {
            "samples": state.samples,
            "tokens": state.tokens,
            "epoch": state.epoch,
            "mlflow_run_id": state.mlflow_run_id,
            "zero_stage": self.train.zero_stage,
            "precision": self.train.precision,
            "reason": reason or "schedule",
            "best": best,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tag_dir = self.files.save(engine, state.step, client, rank_state, mark, run_files)
        if self.rank == 0:
            save_config(self.config, tag_dir / "config.yaml")
            tracker.set_tags({"last_checkpoint": str(tag_dir)})
        return tag_dir
