"""The pre-training loader the trainer iterates: one per rank, exact position, equal batch counts.

Usage (one rank)::

    loader = PretrainLoader(cfg.data, micro_batch_size=32, rank=rank, world_size=world, seed=cfg.seed,
                            tokenizer=tokenizer_dir)
    loader.load_state_dict(checkpoint["data"])          # on resume; else starts at epoch 0, batch 0
    for batch in loader:                                # endless: epoch after epoch
        loss = model(**to_device(batch)).loss
        ...
        checkpoint["data"] = loader.state_dict()        # {"epoch", "batch", "layout"}

or, with explicit epochs, ``for batch in loader.iterate(epoch, start_batch)``. The position is the number of
batches this loader has handed out in the epoch; a trainer that skips a step (a NaN loss) has still consumed
its batch, so the count stays right. A trainer that pulls batches ahead of its steps must store its own count
of consumed batches instead (``{"epoch": e, "batch": consumed}`` works with ``load_state_dict``).

Every rank gets ``batches_per_epoch`` batches in every epoch, whatever the shard sizes and however many
samples turn out unreadable, so collective operations never wait on a rank that ran out of data.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util  # noqa: F401 - registers its exit hook now, before ours (below)
import signal
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.collate import BertCollator, GptCollator
from pipeline.data.config import DataConfig
from pipeline.data.dataset import EpochSpec, RankEpoch, plan_epoch
from pipeline.data.masking import MaskingRule
from pipeline.data.plan import EpochPlan, EpochRest
from pipeline.data.reader import SampleDecoder
from pipeline.data.shards import ShardSet, check_tokenizer, open_shard_set
from pipeline.errors import UserError
from pipeline.signals import ignore_stop_signals, stop_signals_blocked
from pipeline.tokenizer.spm import Tokenizer

log = logging.getLogger(__name__)

# Workers of iterations not yet shut down. They ignore the stop signals (``ignore_stop_signals``), so
# multiprocessing's exit hook, which ends children with SIGTERM and then joins them, would wait for them forever
# if an iteration were never closed: they are killed just before it runs (exit hooks run last-registered first).
_open_workers: set = set()


def _kill_open_workers() -> None:
    if not _open_workers:
        return
    # torch's SIGCHLD handler would raise "DataLoader worker is killed" out of this hook at the first kill,
    # leaving the other workers to the exit hook that cannot end them.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in list(_open_workers):
        if proc.is_alive():
            proc.kill()
    for proc in list(_open_workers):
        proc.join(timeout=5)
    _open_workers.clear()


atexit.register(_kill_open_workers)

LAYOUT_SLOTS = ("world_size", "workers_per_rank", "micro_batch_size")  # what may change within an epoch


class PretrainLoader:
    """Batches of the shards in ``cfg.shards`` for one rank.

    Args:
        cfg: the data section (shards, workers, shuffling, masking, bad-shard policy).
        micro_batch_size: samples per batch on this rank.
        rank, world_size: this rank's place among the data-parallel ranks (not read from the environment).
        seed: decides the shard order, the shuffle and the masks of every epoch.
        tokenizer: the training tokenizer (directory or :class:`Tokenizer`); checked against the manifest
            (``UserError`` when it differs). Whole-word masking needs it (else the manifest's path is tried).
        shard_set: a precomputed :func:`open_shard_set` result (e.g. checked on rank 0 and broadcast); by
            default each rank checks the shards itself, which gives the same list on a shared file system.
        pin_memory: default: when CUDA is available.
        with_keys: also report each batch's sample keys in ``last_keys`` (tests, inspection).
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        tokenizer: Tokenizer | str | Path | None = None,
        shard_set: ShardSet | None = None,
        pin_memory: bool | None = None,
        with_keys: bool = False,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within [0, world_size {world_size})")
        self.cfg = cfg
        self.micro_batch_size, self.rank, self.world_size, self.seed = micro_batch_size, rank, world_size, seed
        self.shard_set = shard_set or open_shard_set(cfg.shards, cfg.verify_shards, cfg.on_bad_shard)
        self.tokenizer = check_tokenizer(self.shard_set, tokenizer) if tokenizer is not None else None
        self.workers_per_rank = max(1, cfg.num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.with_keys = with_keys
        self.collate = self._collator()
        self.decoder = SampleDecoder(
            self.shard_set.objective, self.shard_set.seq_len, self.shard_set.vocab_size, self.shard_set.static_masks
        )
        plan = self.plan(0)
        if plan.batches_per_slot == 0:
            raise UserError(
                f"{self.shard_set.directory}: {plan.num_samples} samples are fewer than one batch per reader "
                f"(world_size {world_size} x workers {self.workers_per_rank} x micro_batch_size "
                f"{micro_batch_size} = {plan.num_slots * micro_batch_size}): lower data.num_workers or the batch"
            )
        # Facts that are the same in every epoch (only which samples are left out changes).
        self.batches_per_epoch = plan.batches_per_rank  # per rank
        self.samples_per_epoch = plan.samples_used  # all ranks together
        self.samples_dropped_per_epoch = plan.samples_dropped  # all ranks together, < slots x micro-batch
        self.stats = {
            "shards_excluded": len(self.shard_set.bad),
            "read_errors": 0,  # damaged members or shards met while reading (this rank)
            "samples_substituted": 0,  # samples repeated in place of unreadable ones (this rank)
        }
        self.last_keys: list[str] | None = None
        self._epoch, self._batch = 0, 0

    # -- per-epoch facts ---------------------------------------------------------------------------------------
    @property
    def objective(self) -> str:
        return self.shard_set.objective

    @property
    def seq_len(self) -> int:
        return self.shard_set.seq_len

    @property
    def tokens_per_batch(self) -> int:
        """Positions the model processes per batch (with pad_to=seq_len; an upper bound with pad_to=batch)."""
        return self.micro_batch_size * self.seq_len

    @property
    def mean_real_tokens_per_batch(self) -> float:
        """Non-padding tokens per batch on average (the manifest's mean); exact: ``attention_mask.sum()``."""
        if self.objective == "gpt":
            return float(self.tokens_per_batch)
        return self.micro_batch_size * self.shard_set.mean_tokens_per_sample

    def plan(self, epoch: int, history: tuple = ()) -> EpochPlan | EpochRest:
        return plan_epoch(
            [s.num_samples for s in self.shard_set.shards], epoch, self.seed, self.cfg.shuffle_window,
            (self.world_size, self.workers_per_rank, self.micro_batch_size), history,
        )  # fmt: skip

    # -- iteration -------------------------------------------------------------------------------------------
    def iterate(self, epoch: int, start_batch: int = 0, history=()) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches ``start_batch ..`` of ``epoch`` (``batches_in_epoch(epoch, history)`` of them).

        ``history``: the earlier layouts of this epoch and the batches each of their ranks consumed
        (``{"world_size", "workers_per_rank", "micro_batch_size", "batches"}``, oldest first) when a run
        continues on another layout: then this loader reads exactly what they had not (``EpochRest``).
        """
        history = self.check_history(history)
        plan = self.plan(epoch, history)
        num_batches = plan.batches_per_rank
        if not 0 <= start_batch <= num_batches:
            raise ValueError(f"start_batch {start_batch} is not within [0, {num_batches}]")
        if start_batch == 0 and self.rank == 0:
            log.info(
                "data epoch %d%s: %d batches per rank, %d samples used, %d left out this epoch, %d shards excluded",
                epoch,
                f" (the rest, after {len(history)} other layout(s))" if history else "",
                num_batches,
                plan.samples_used,
                plan.samples_dropped,
                len(self.shard_set.bad),
            )
        spec = self.epoch_spec(epoch, start_batch, history)
        workers = self.cfg.num_workers
        # A new DataLoader per epoch: its workers are told the epoch and start position when they fork; persistent
        # workers would keep the first epoch's copy of the dataset.
        loader = DataLoader(
            RankEpoch(spec),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            pin_memory=self.pin_memory,
            # The job's SIGTERM / SIGUSR1 / SIGINT reach the workers too (SLURM signals every process of a job
            # step, a terminal its foreground group): they must outlive it until the rank has checkpointed.
            worker_init_fn=ignore_stop_signals,
            # Its own generator: starting workers must not draw from the global torch RNG, or a resumed run's
            # dropout stream would differ from the uninterrupted run's.
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        W = self.workers_per_rank
        index = start_batch
        with stop_signals_blocked():  # until each worker has run ignore_stop_signals
            batches = iter(loader)
        workers = list(getattr(batches, "_workers", ()))  # the processes just started (none without workers)
        _open_workers.update(workers)
        try:
            for batch, meta in batches:
                expected_slot = self.rank * W + index % W
                if (meta.epoch, meta.slot, meta.slot_batch) != (epoch, expected_slot, index // W):
                    raise RuntimeError(
                        f"data loader order broken: rank batch {index} of epoch {epoch} came from slot {meta.slot} "
                        f"batch {meta.slot_batch} (epoch {meta.epoch}), expected slot {expected_slot} "
                        f"batch {index // W}"
                    )
                self.stats["read_errors"] += meta.read_errors
                self.stats["samples_substituted"] += meta.samples_substituted
                self.last_keys = meta.keys
                index += 1
                # The position moves before the batch is handed out: a checkpoint taken after the step that used
                # it must resume after it.
                self._epoch, self._batch = (epoch + 1, 0) if index == num_batches else (epoch, index)
                yield batch
        finally:
            # Stop the workers now. The traceback of an error raised in a worker holds the iterator; collected
            # later in a reference cycle, after its queues, torch would wait 5 s for each worker that never
            # receives its stop signal. Nothing else ends them (they ignore the stop signals): whoever stops
            # iterating early closes this generator (``close()``), as the training loop does.
            shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean-up, absent without workers
            if shutdown is not None:
                shutdown()
            for proc in workers:  # one that did not take its stop message in time: torch's terminate() is ignored
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=5)
            _open_workers.difference_update(workers)
        if index != num_batches:
            raise RuntimeError(f"epoch {epoch} ended after {index} of {num_batches} batches on rank {self.rank}")

    def check_history(self, history) -> tuple[tuple[int, int, int, int], ...]:
        """``history`` as the workers' tuples; a layout that differs in more than ranks, workers and micro-batch
        (seed, shuffle window, shards) cannot continue the epoch's sample order: ``UserError``."""
        fixed = {k: v for k, v in self.layout().items() if k not in LAYOUT_SLOTS}
        out = []
        for entry in history:
            other = {k: entry[k] for k in fixed if k in entry}
            if other != {k: fixed[k] for k in other}:
                diff = ", ".join(f"{k} {other[k]} -> {fixed[k]}" for k in other if other[k] != fixed[k])
                raise UserError(f"the epoch began with another data order ({diff}): it cannot continue exactly")
            out.append((*(int(entry[k]) for k in LAYOUT_SLOTS), int(entry["batches"])))
        return tuple(out)

    def batches_in_epoch(self, epoch: int, history=()) -> int:
        """This rank's batches in ``epoch`` (all of them; or, after ``history``, those of the rest)."""
        return self.plan(epoch, self.check_history(history)).batches_per_rank

    def epoch_spec(self, epoch: int, start_batch: int = 0, history: tuple = ()) -> EpochSpec:
        """What this rank's workers are given for ``epoch`` (picklable)."""
        return EpochSpec(
            shards=self.shard_set.shards,
            epoch=epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            workers_per_rank=self.workers_per_rank,
            micro_batch_size=self.micro_batch_size,
            shuffle_window=self.cfg.shuffle_window,
            start_batch=start_batch,
            decoder=self.decoder,
            collate=self.collate,
            fail_on_bad_shard=self.cfg.on_bad_shard == "fail",
            with_keys=self.with_keys,
            history=tuple(history),
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless: from the current position, epoch after epoch."""
        while True:
            yield from self.iterate(self._epoch, self._batch)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._epoch

    # -- position --------------------------------------------------------------------------------------------
    def layout(self) -> dict:
        """What the position is relative to: resuming with a different layout would not continue the stream."""
        return {
            "world_size": self.world_size,
            "workers_per_rank": self.workers_per_rank,
            "micro_batch_size": self.micro_batch_size,
            "shuffle_window": self.cfg.shuffle_window,
            "seed": self.seed,
            "shards": self.shard_set.fingerprint(),
        }

    def state_dict(self) -> dict:
        """The position: the next batch's epoch and index, and the layout it refers to.

        Every rank consumes the same number of batches, so the position is the same on every rank; storing
        rank 0's (DeepSpeed's client_state) is enough, and a per-rank copy does no harm.
        """
        return {"epoch": self._epoch, "batch": self._batch, "layout": self.layout()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from ``state``; with a different layout raise (``strict``) or restart that epoch."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        saved = state.get("layout")
        if saved is not None and saved != self.layout():
            diff = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in self.layout().items() if saved.get(k) != v)
            if strict:
                raise UserError(
                    f"the saved data position belongs to another data layout ({diff}): the stream cannot continue "
                    "exactly; resume with the same settings, or load with strict=False to restart epoch "
                    f"{epoch} from its beginning"
                )
            log.warning("data layout changed (%s): restarting epoch %d from its first batch", diff, epoch)
            batch = 0
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self._epoch, self._batch = epoch, batch

    # -- construction helpers --------------------------------------------------------------------------------
    def _collator(self):
        shards, cfg = self.shard_set, self.cfg
        if shards.objective == "gpt":
            if cfg.packing:
                raise UserError("data.packing is for BERT pairs; GPT blocks are packed already (no padding)")
            return GptCollator(shards.seq_len)
        special_ids = shards.special_ids
        masking = None
        if not shards.static_masks:
            special = np.zeros(shards.vocab_size, dtype=bool)
            special[list(special_ids.values())] = True
            masking = MaskingRule(
                mask_prob=cfg.mask_prob,
                mask_replace_prob=cfg.mask_replace_prob,
                random_replace_prob=cfg.random_replace_prob,
                max_predictions=cfg.max_predictions_per_seq,
                mask_id=special_ids["mask"],
                special=special,
                replacement_ids=np.flatnonzero(~special).astype(np.int64),
                word_start=self._word_start() if cfg.whole_word_mask else None,
            )
        elif cfg.whole_word_mask:
            log.warning("data.whole_word_mask has no effect: the shards carry static masks")
        return BertCollator(
            seq_len=shards.seq_len,
            pad_to=cfg.pad_to,
            pad_id=special_ids["pad"],
            sep_id=special_ids["sep"],
            masking=masking,
            packing=cfg.packing,
        )

    def _word_start(self) -> np.ndarray:
        tokenizer = self.tokenizer
        if tokenizer is None:  # the manifest's tokenizer, if it is still where the shards were written
            try:
                tokenizer = check_tokenizer(self.shard_set, self.shard_set.tokenizer_path)
            except UserError as exc:
                raise UserError(f"data.whole_word_mask needs the tokenizer (pass tokenizer=...): {exc}") from None
        return np.asarray(tokenizer.word_start, dtype=bool)

    def describe(self) -> dict:
        """Facts for the run's log / MLflow params."""
        return {
            "shards": self.shard_set.directory,
            "objective": self.objective,
            "seq_len": self.seq_len,
            "num_shards": len(self.shard_set.shards),
            "shards_excluded": [name for name, _ in self.shard_set.bad],
            "batches_per_epoch": self.batches_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "samples_dropped_per_epoch": self.samples_dropped_per_epoch,
            "tokens_per_batch": self.tokens_per_batch,
            "layout": self.layout(),
            "config": asdict(self.cfg),
        }
