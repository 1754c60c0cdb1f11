"""Reading a slot's samples from the shards: the tar stream (``tar_stream``, which finds its way past damage), a
counting error handler, decoding and validation, and the replacement of samples lost to damage found while a
shard is read.

Every sample carries its epoch position. A window of the plan must always come out with its full size, or
the ranks' batch counts drift apart and the job hangs at the epoch's end; samples that could not be read
(truncated tar, garbage over members, invalid ids) are therefore replaced by repeating the window's readable
samples, and counted. Samples after a damaged region are read again from the next valid tar header, at their
own positions. What is read and replaced depends only on the shard's bytes and the window, so a resumed run
reads and replaces identically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.data.npy import npy_array
from pipeline.data.plan import EpochPlan, Piece, Segment
from pipeline.data.shards import Shard
from pipeline.data.tar_stream import tar_samples
from pipeline.preprocess.samples import BERT_FIELD, GPT_FIELD, MLM_FIELD

log = logging.getLogger(__name__)

_MAX_LOGGED = 20  # errors logged per process; the rest are only counted


class ShardReadError(RuntimeError):
    """A shard could not be read and ``data.on_bad_shard`` is ``fail``."""


class CountingHandler:
    """An error handler that counts and skips (``fail``: raises): damaged regions of a tar stream, members that
    do not decode, shards that end early.

    (webdataset's ``warn_and_continue`` sleeps half a second per error, which turns a damaged shard of many
    bad members into minutes of stall, and its default handler re-raises.)
    """

    def __init__(self, fail: bool):
        self.fail = fail
        self.errors = 0

    def __call__(self, exn: BaseException) -> bool:
        self.errors += 1
        if self.fail:
            raise ShardReadError(f"reading a shard failed (data.on_bad_shard=fail): {exn}") from exn
        if self.errors <= _MAX_LOGGED:
            log.warning("skipping unreadable shard data (%d so far): %s", self.errors, exn)
        return True  # webdataset: continue with what follows


@dataclass(frozen=True)
class Sample:
    key: str
    ids: np.ndarray  # BERT: [is_random_next, [CLS], A, [SEP], B, [SEP]]; GPT: seq_len + 1 ids
    mlm: np.ndarray | None = None  # BERT static masks: int32 [2, n] (positions in ids[1:], original ids)


class SampleDecoder:
    """Bytes of a webdataset sample -> a validated :class:`Sample` (ValueError when it is not usable).

    Validation is what keeps a damaged member from reaching the model: an id beyond the vocabulary would be
    a device-side assert on a GPU, far from its cause.
    """

    def __init__(self, objective: str, seq_len: int, vocab_size: int, static_masks: bool):
        self.objective, self.seq_len, self.vocab_size = objective, seq_len, vocab_size
        self.field = GPT_FIELD if objective == "gpt" else BERT_FIELD
        self.static_masks = static_masks

    def __call__(self, sample: dict) -> Sample:
        data = sample.get(self.field)
        if data is None:
            raise ValueError(f"sample {sample.get('__key__')} has no {self.field}")
        ids = npy_array(data)
        if ids.ndim != 1 or ids.dtype.kind != "u":
            raise ValueError(f"sample {sample['__key__']}: {self.field} is not a 1-d unsigned array")
        n = len(ids)
        if self.objective == "gpt":
            if n != self.seq_len + 1:
                raise ValueError(f"sample {sample['__key__']}: {n} ids, expected seq_len + 1 = {self.seq_len + 1}")
            bad = ids.max() >= self.vocab_size
        else:
            if not 4 <= n <= self.seq_len + 1:
                raise ValueError(f"sample {sample['__key__']}: {n - 1} tokens, expected 3..{self.seq_len}")
            bad = ids[0] > 1 or ids[1:].max() >= self.vocab_size
        if bad:
            raise ValueError(f"sample {sample['__key__']}: ids outside the vocabulary ({self.vocab_size})")
        mlm = None
        if self.static_masks:
            if MLM_FIELD not in sample:
                raise ValueError(f"sample {sample['__key__']} has no {MLM_FIELD}")
            mlm = npy_array(sample[MLM_FIELD])
            if mlm.ndim != 2 or mlm.shape[0] != 2 or (mlm.size and (mlm.min() < 0 or mlm[0].max() >= n - 1)):
                raise ValueError(f"sample {sample['__key__']}: {MLM_FIELD} is not [2, n] positions and labels")
        return Sample(sample["__key__"], ids, mlm)


class SliceReader:
    """Reads epoch positions with webdataset (one ``DataPipeline`` per shard piece) and fills windows."""

    def __init__(self, shards: list[Shard], decoder: SampleDecoder, fail: bool):
        self.shards = shards
        self.decoder = decoder
        self.handler = CountingHandler(fail)
        self.substituted = 0  # samples that repeat another because theirs could not be read

    def read(self, segments: list[Segment]) -> Iterator[tuple[int, Sample]]:
        """(epoch position, sample) for every readable sample of the segments, in order."""
        for seg in segments:
            url = self.shards[seg.shard].path
            # Readers skip to the segment's start by reading through the tar (a stream has no index); the
            # samples skipped are never decoded.
            stream = tar_samples(url, self.handler)
            last = -1
            try:
                for ordinal, raw in stream:
                    last = ordinal
                    if ordinal >= seg.stop:
                        break
                    if ordinal >= seg.start:
                        try:
                            sample = self.decoder(raw)
                        except Exception as exc:  # any damage in a member's bytes: count it, never crash the job
                            self.handler(ValueError(f"{exc} @ {url}"))
                        else:
                            yield seg.position + ordinal - seg.start, sample
                    if ordinal + 1 >= seg.stop:
                        break
            finally:
                stream.close()
            if last + 1 < seg.stop:
                # A stream cut at a member boundary ends without an error: the count is the check.
                shard = self.shards[seg.shard]
                self.handler(ShardReadError(f"{url} ended after {last + 1} of the {shard.num_samples} samples listed"))

    def windows(self, plan: EpochPlan, slot: int, first_window: int) -> Iterator[tuple[int, list[Sample]]]:
        """(window index, its samples in position order) from ``first_window`` to the slot's last window.

        One stream runs over the whole rest of the slice, so a shard that spans two windows is opened once.
        """
        begin = plan.window_range(slot, first_window)[0]
        end = plan.slot_range(slot)[1]
        stream = self.read(plan.segments(begin, end))
        pending: tuple[int, Sample] | None = None
        for window in range(first_window, plan.num_windows()):
            lo, hi = plan.window_range(slot, window)
            got: list[Sample] = []
            if pending is not None and pending[0] < hi:
                got.append(pending[1])
                pending = None
            if pending is None:
                for position, sample in stream:
                    if position >= hi:
                        pending = (position, sample)
                        break
                    got.append(sample)
            yield window, self._fill(got, hi - lo, plan, hi)

    def pieces(self, plan: EpochPlan, pieces: list[Piece]) -> Iterator[tuple[int, int, Sample]]:
        """(slot, index in the slot's stream, sample) for the samples of ``pieces`` (spans of ``plan``'s
        permuted windows), in order.

        Consecutive windows of one slot are read through one stream (``windows``), as a slot's own stream is.
        """
        i = 0
        while i < len(pieces):
            slot = pieces[i].slot
            windows = self.windows(plan, slot, pieces[i].window)
            try:
                for window, samples in windows:
                    piece = pieces[i]
                    order = plan.window_permutation(slot, window, len(samples))
                    first = window * plan.shuffle_window
                    for k in range(piece.start, piece.stop):
                        yield slot, first + k, samples[order[k]]
                    i += 1
                    if i == len(pieces) or (pieces[i].slot, pieces[i].window) != (slot, window + 1):
                        break
            finally:
                windows.close()

    def _fill(self, got: list[Sample], size: int, plan: EpochPlan, after: int) -> list[Sample]:
        deficit = size - len(got)
        if deficit == 0:
            return got
        pool = got or self._spares(plan, after, size)
        if not pool:
            raise ShardReadError(f"no readable sample in any of the {len(self.shards)} shards")
        self.substituted += deficit
        log.warning("%d samples of an epoch window could not be read; repeating readable ones instead", deficit)
        return got + [pool[i % len(pool)] for i in range(deficit)]

    def _spares(self, plan: EpochPlan, after: int, count: int) -> list[Sample]:
        """A window with no readable sample at all borrows the next readable ones of the epoch's sequence."""
        segments = plan.segments(after, plan.num_samples) + plan.segments(0, after)
        spares = []
        for _, sample in self.read(segments):
            spares.append(sample)
            if len(spares) == count:
                break
        return spares
