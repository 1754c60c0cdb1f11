"""The epoch plan: which samples every (rank, worker) slot reads, in which order, for one epoch.

webdataset 1.x splits whole shards between ranks, so uneven shards give ranks unequal batch counts (and a
DDP hang at the epoch's end), and it keeps no position to resume from. The manifest knows every shard's sample
count, so the plan partitions samples instead:

1. the shard order is shuffled with (seed, epoch) and the shards' sample ranges are laid end to end, giving
   the epoch's sequence of ``num_samples`` positions;
2. the sequence is cut into ``num_slots = world_size * workers_per_rank`` contiguous slices of
   ``batches_per_slot * micro_batch_size`` samples each; slot ``rank * workers_per_rank + worker`` reads slice
   number ``slot``. The remainder (fewer than ``num_slots * micro_batch_size`` samples) is not used this
   epoch; since the shard order changes every epoch, so do the samples left out;
3. each slot reads its slice in windows of ``shuffle_window`` samples and yields every window in the order of
   a permutation seeded by (seed, epoch, slot, window).

A position in an epoch is therefore a count of samples consumed per slot, and a slot that has consumed ``c``
samples resumes by re-reading window ``c // shuffle_window`` and skipping ``c % shuffle_window`` of its
permutation: no replay of the epoch, and bitwise the same stream.

A slot's stream is a list of :class:`Piece` s, spans of permuted windows. That is also how an epoch continues
on another layout (another number of ranks or workers, a universal checkpoint): :class:`EpochRest` takes what
every slot of the earlier layout had not consumed yet, in stream order, and cuts it into the new layout's slots
as above. No sample of the epoch is read twice or skipped; as in every epoch, fewer than ``num_slots *
micro_batch_size`` samples are left out (counted in ``samples_dropped``). A rest of a rest works the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Separate random streams per purpose, so changing one use never shifts another.
SHARD_ORDER, WINDOW_ORDER, MASKING = 0, 1, 2


def rng_for(seed: int, purpose: int, *path: int) -> np.random.Generator:
    """A generator determined by (seed, purpose, path...) alone: no global state, same in every process."""
    return np.random.default_rng([seed, purpose, *path])


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (ordinals in the tar file) of shard ``shard``, at epoch position ``position``."""

    shard: int
    start: int
    stop: int
    position: int


@dataclass(frozen=True)
class Piece:
    """Stream positions ``[start, stop)`` of window ``window`` of slot ``slot`` of the epoch's base plan, in that
    window's permuted order."""

    slot: int
    window: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def cut(stream: list[Piece], begin: int, end: int | None = None) -> list[Piece]:
    """Samples ``[begin, end)`` of a stream of pieces, as pieces."""
    out, offset = [], 0
    end = sum(map(len, stream)) if end is None else end
    for piece in stream:
        a, b = max(begin - offset, 0), min(end - offset, len(piece))
        if a < b:
            out.append(Piece(piece.slot, piece.window, piece.start + a, piece.start + b))
        offset += len(piece)
        if offset >= end:
            break
    return out


class _Slots:
    """``num_samples`` cut into ``world_size * workers_per_rank`` slots of whole micro-batches (the rest left out)."""

    world_size: int
    workers_per_rank: int
    micro_batch_size: int

    def _partition(self, num_samples: int) -> None:
        self.num_slots = self.world_size * self.workers_per_rank
        self.batches_per_slot = num_samples // (self.num_slots * self.micro_batch_size)
        self.samples_per_slot = self.batches_per_slot * self.micro_batch_size
        self.samples_used = self.samples_per_slot * self.num_slots
        self.samples_dropped = num_samples - self.samples_used
        self.batches_per_rank = self.batches_per_slot * self.workers_per_rank

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.workers_per_rank + worker


class EpochPlan(_Slots):
    """The partition of one epoch; identical in every process given the same arguments."""

    generation = 0  # how many layouts came before this one in the epoch (EpochRest: 1 or more)

    def __init__(
        self,
        shard_samples: list[int],
        *,
        epoch: int,
        seed: int,
        world_size: int,
        workers_per_rank: int,
        micro_batch_size: int,
        shuffle_window: int,
    ):
        if world_size < 1 or workers_per_rank < 1 or micro_batch_size < 1:
            raise ValueError("world_size, workers_per_rank and micro_batch_size must be >= 1")
        self.epoch, self.seed = epoch, seed
        self.world_size, self.workers_per_rank = world_size, workers_per_rank
        self.micro_batch_size, self.shuffle_window = micro_batch_size, shuffle_window
        self.shard_samples = np.asarray(shard_samples, dtype=np.int64)
        self.order = rng_for(seed, SHARD_ORDER, epoch).permutation(len(shard_samples))
        sizes = self.shard_samples[self.order]
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # epoch position where each shard (in order) begins
        self.num_samples = int(self.starts[-1])
        self._partition(self.num_samples)

    @property
    def base(self) -> EpochPlan:
        """The plan whose windows the pieces of every stream refer to."""
        return self

    def stream(self, slot: int) -> list[Piece]:
        """The slot's samples in reading order: its windows, each in its permuted order."""
        pieces = []
        for window in range(self.num_windows()):
            lo, hi = self.window_range(slot, window)
            pieces.append(Piece(slot, window, 0, hi - lo))
        return pieces

    def slot_range(self, slot: int) -> tuple[int, int]:
        start = slot * self.samples_per_slot
        return start, start + self.samples_per_slot

    def num_windows(self) -> int:
        return -(-self.samples_per_slot // self.shuffle_window)

    def window_range(self, slot: int, window: int) -> tuple[int, int]:
        """Epoch positions of a slot's window (the last window of a slice may be shorter)."""
        begin, end = self.slot_range(slot)
        start = begin + window * self.shuffle_window
        return start, min(start + self.shuffle_window, end)

    def window_permutation(self, slot: int, window: int, size: int) -> np.ndarray:
        return rng_for(self.seed, WINDOW_ORDER, self.epoch, slot, window).permutation(size)

    def segments(self, begin: int, end: int) -> list[Segment]:
        """The pieces of shards that hold epoch positions ``[begin, end)``, in order."""
        out = []
        first = int(np.searchsorted(self.starts, begin, side="right")) - 1
        for k in range(max(first, 0), len(self.order)):
            lo, hi = int(self.starts[k]), int(self.starts[k + 1])
            if lo >= end:
                break
            a, b = max(lo, begin), min(hi, end)
            if a < b:
                out.append(Segment(int(self.order[k]), a - lo, b - lo, a))
        return out

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, sample ordinal) of an epoch position."""
        k = int(np.searchsorted(self.starts, position, side="right")) - 1
        return int(self.order[k]), position - int(self.starts[k])


class EpochRest(_Slots):
    """The rest of an epoch on a new layout, after ``prev`` (an :class:`EpochPlan` or an earlier rest) had
    handed out ``rank_batches`` batches to each of its ranks.

    What the earlier slots had not consumed, slot after slot in stream order, is cut into ``world_size *
    workers_per_rank`` slices of ``batches_per_slot * micro_batch_size`` samples; the remainder is left out.
    Same interface as :class:`EpochPlan` for the reader (``stream``, ``base``, counts).
    """

    def __init__(self, prev, rank_batches: int, *, world_size: int, workers_per_rank: int, micro_batch_size: int):
        if not 0 <= rank_batches <= prev.batches_per_rank:
            raise ValueError(f"{rank_batches} batches consumed per rank, but the epoch had {prev.batches_per_rank}")
        self.prev = prev
        self.generation = prev.generation + 1
        self.epoch, self.seed, self.shuffle_window = prev.epoch, prev.seed, prev.shuffle_window
        self.world_size, self.workers_per_rank, self.micro_batch_size = world_size, workers_per_rank, micro_batch_size
        rest: list[Piece] = []
        for rank in range(prev.world_size):
            for worker in range(prev.workers_per_rank):
                done = batches_consumed_by_worker(rank_batches, worker, prev.workers_per_rank) * prev.micro_batch_size
                rest.extend(cut(prev.stream(prev.slot(rank, worker)), done))
        self.num_samples = sum(map(len, rest))  # not yet consumed in this epoch
        self._partition(self.num_samples)
        self._rest = rest

    @property
    def base(self) -> EpochPlan:
        return self.prev.base

    def stream(self, slot: int) -> list[Piece]:
        return cut(self._rest, slot * self.samples_per_slot, (slot + 1) * self.samples_per_slot)


def batches_consumed_by_worker(rank_batches: int, worker: int, workers_per_rank: int) -> int:
    """How many of a rank's first ``rank_batches`` batches came from ``worker``.

    The DataLoader hands batches out round-robin, so the rank's batch ``j`` is worker ``j % workers``'s batch
    ``j // workers``.
    """
    return len(range(worker, rank_batches, workers_per_rank))
