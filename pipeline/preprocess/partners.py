"""NotNext partners from anywhere in the input (``data.random_next_scope corpus``).

Google's ``create_pretraining_data.py`` takes the B segment of a NotNext pair from a random document of its whole
input, which it holds in memory. A unit here holds only itself and a small pool: before building its pairs it
draws ``random_next_windows`` places in the input, seeded by (seed, job, unit) and weighted by bytes, and reads
whole documents at each until it has ``random_next_window_bytes`` of text (a longer document gives an excerpt of
that size at a random place, whose cut first and last sentences are dropped). NotNext segments are then drawn
from the pool as Google's are from all documents: a random document other than A's own, a random start sentence,
sentences up to the length B needs.

The places depend only on the plan (file sizes, Parquet metadata) and the seed, so the pool and the output are
the same for any worker count, task split or resumed attempt, and a unit's memory grows by its pool only.
Reaching a place is a seek in uncompressed ``.txt``/``.jsonl``; in a compressed file it means decompressing up to
it, which is bounded for small files and for split ``.jsonl.gz`` ranges (``input.gzip_split_max_bytes``); in
Parquet it decodes the rows before it in its row group. Compressed files read as one stream (a larger
``.jsonl.gz``, a blank-line ``.txt.gz`` above ``unit_bytes``) cannot be reached at a random place: they are left
out of the draw, and ``shard`` warns how much of the input that is.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.preprocess.plan import Job
from pipeline.text.readers import (
    Document,
    InputConfig,
    InputFile,
    ReadStats,
    decode,
    guarded,
    open_binary,
    read_file,
    read_jsonl,
    read_parquet,
    read_txt,
)


@dataclass
class PartnerDocument:
    text: str
    file: int  # index in the plan's file list
    offset: int  # Document.offset: with ``file``, the document's identity (to tell A's own document apart)
    cut_head: bool = False  # an excerpt starting mid-document: its first sentence is partial
    cut_tail: bool = False  # ... ending mid-document: its last sentence is partial


def reachable(job: Job, files: list[InputFile]) -> bool:
    """Can a random place in this job be reached without reading the job from its start?"""
    if job.kind == "stream":  # a compressed .jsonl.gz too large to split, or a blank-line .txt[.gz]
        f = files[job.files[0]]
        return f.format == "txt" and not f.compressed
    return True


def _whole_characters(raw: bytes, head: bool, tail: bool) -> bytes:
    """Drop the partial UTF-8 characters that a cut at arbitrary bytes leaves at either end."""
    start = 0
    if head:
        while start < min(3, len(raw)) and raw[start] & 0xC0 == 0x80:
            start += 1
    end = len(raw)
    if tail and end > start:
        k = end - 1
        while k > start and end - k < 4 and raw[k] & 0xC0 == 0x80:
            k -= 1
        lead = raw[k]
        width = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if k + width > end:
            end = k
    return raw[start:end]


class PartnerIndex:
    """The reachable jobs of a plan, by cumulative bytes: where a unit's random-next windows may fall."""

    def __init__(self, jobs: list[Job], files: list[InputFile], cfg: InputConfig):
        self.files = files
        self.cfg = cfg
        self.jobs = [j for j in jobs if j.size > 0 and reachable(j, files)]
        self.cumulative = list(itertools.accumulate(j.size for j in self.jobs))
        self.unreachable_bytes = sum(j.size for j in jobs if not reachable(j, files))
        self.file_index = {f.path: i for i, f in enumerate(files)}
        self._row_groups: dict[int, list[tuple[int, int]]] = {}  # per Parquet file: (bytes, rows) per row group

    @property
    def total_bytes(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def pool(self, rng: random.Random, windows: int, window_bytes: int) -> list[PartnerDocument]:
        """Documents read at ``windows`` places drawn with ``rng`` (empty when nothing can be reached)."""
        out: list[PartnerDocument] = []
        if not self.total_bytes:
            return out
        for _ in range(windows):
            x = rng.random() * self.total_bytes
            k = min(bisect.bisect_right(self.cumulative, x), len(self.jobs) - 1)
            job = self.jobs[k]
            fraction = (x - (self.cumulative[k] - job.size)) / job.size
            out.extend(self._window(job, fraction, window_bytes, rng))
        return out

    # -- one window ---------------------------------------------------------------------------------------------
    def _window(self, job: Job, fraction: float, budget: int, rng: random.Random) -> list[PartnerDocument]:
        scratch = ReadStats()  # partners are read again elsewhere as A documents: their reading is not counted
        if job.kind == "files":
            sizes = [self.files[i].size for i in job.files]
            x = fraction * sum(sizes)
            k = min(bisect.bisect_right(list(itertools.accumulate(sizes)), x), len(sizes) - 1)
            f = self.files[job.files[k]]
            local = (x - sum(sizes[:k])) / max(sizes[k], 1)
            if f.format == "txt" and self.cfg.txt_documents == "file":
                return self._file_excerpt(f, local, budget, scratch)
            # A small file (<= unit_bytes): read it and start at the document at that fraction of its text.
            docs = list(read_file(f, self.cfg, scratch))
            ends = list(itertools.accumulate(len(d.text) for d in docs))
            first = bisect.bisect_right(ends, local * ends[-1]) if ends else 0
            return self._take(iter(docs[first:]), budget, rng)
        f = self.files[job.files[0]]
        if job.kind == "range":
            start = job.start + int(fraction * job.size)
            documents = read_jsonl(f, self.cfg, scratch, start, seek=True)
        elif job.kind == "stream":
            documents = read_txt(f, self.cfg, scratch, start=int(fraction * f.size))
        else:
            groups = self._parquet_groups(job.files[0])
            weights = list(itertools.accumulate(max(groups[g][0], 1) for g in job.row_groups))
            x = fraction * weights[-1]
            k = min(bisect.bisect_right(weights, x), len(job.row_groups) - 1)
            g = job.row_groups[k]
            local = (x - (weights[k] - max(groups[g][0], 1))) / max(groups[g][0], 1)
            documents = read_parquet(f, self.cfg, scratch, [g], skip_rows=int(local * groups[g][1]))
        with contextlib.closing(guarded(f, documents, scratch)) as docs:
            return self._take(docs, budget, rng)

    def _take(self, docs: Iterator[Document], budget: int, rng: random.Random) -> list[PartnerDocument]:
        """Whole documents until ``budget`` characters; a document longer than that gives a random excerpt."""
        out: list[PartnerDocument] = []
        size = 0
        for doc in docs:
            text, cut_head, cut_tail = doc.text, False, False
            if len(text) > budget:
                start = rng.randrange(len(text) - budget + 1)
                text, cut_head, cut_tail = text[start : start + budget], start > 0, start + budget < len(doc.text)
            out.append(PartnerDocument(text, self.file_index[doc.path], doc.offset, cut_head, cut_tail))
            size += len(text)
            if size >= budget:
                break
        return out

    def _file_excerpt(self, f: InputFile, fraction: float, budget: int, scratch: ReadStats) -> list[PartnerDocument]:
        """``budget`` bytes of a one-document file at ``fraction`` of it (a seek when it is not compressed)."""
        with open_binary(f) as fh:
            if f.compressed:
                whole = fh.read()
                size = len(whole)
                start = int(fraction * max(0, size - budget))
                raw = whole[start : start + budget]
            else:
                size = f.size
                start = int(fraction * max(0, size - budget))
                fh.seek(start)
                raw = fh.read(budget)
        cut_head, cut_tail = start > 0, start + len(raw) < size
        text = decode(_whole_characters(raw, cut_head, cut_tail), f.path, self.cfg, scratch)
        if text is None or not text.strip():
            return []
        return [PartnerDocument(text, self.file_index[f.path], 0, cut_head, cut_tail)]

    def _parquet_groups(self, file_index: int) -> list[tuple[int, int]]:
        groups = self._row_groups.get(file_index)
        if groups is None:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(self.files[file_index].path).metadata
            groups = [
                (meta.row_group(g).total_byte_size, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
            ]
            self._row_groups[file_index] = groups
        return groups
