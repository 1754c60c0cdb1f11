"""Split the inputs into jobs, the same way whatever the number of workers or tasks.

A job is a piece of input that one worker reads from start to end:

- ``files``: consecutive small files read whole (one-document-per-file text, small JSONL/Parquet files),
  grouped until they hold ``unit_bytes`` and at least ``min_docs_per_unit`` files;
- ``range``: the lines of a large JSONL file whose first byte lies in ``[start, end)`` (offsets in the
  decompressed stream for ``.jsonl.gz`` up to ``input.gzip_split_max_bytes``);
- ``stream``: a larger compressed file, or a large blank-line-separated text file, read as one stream;
- ``parquet``: a run of row groups of a Parquet file.

A worker cuts a job's document stream into units of about ``unit_bytes`` of text (see ``iter_units``); every
random choice is seeded by ``(seed, job, unit)`` and every unit writes its own shards, so the output depends
only on the inputs and the content config. The plan is computed from file sizes and Parquet metadata only:
no input is read before the work starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from pipeline.text.readers import (
    Document,
    InputConfig,
    InputFile,
    ReadStats,
    check_parquet_schema,
    guarded,
    gzip_uncompressed_size,
    read_file,
    read_jsonl,
    read_parquet,
)


@dataclass(frozen=True)
class Job:
    index: int
    kind: str  # files | range | stream | parquet
    files: tuple[int, ...]  # indices into the plan's file list
    size: int  # bytes of input (estimated for parquet)
    start: int = 0
    end: int = 0
    row_groups: tuple[int, ...] = ()
    hashes: tuple[int, ...] = field(default=())  # files whose sha256 this job records (each file exactly once)

    @property
    def stem(self) -> str:
        return f"{self.index:06d}"


def plan_jobs(files: list[InputFile], cfg: InputConfig, unit_bytes: int, min_docs: int) -> list[Job]:
    jobs: list[Job] = []
    group: list[int] = []
    group_size = 0

    def flush() -> None:
        nonlocal group, group_size
        if group:
            jobs.append(Job(len(jobs), "files", tuple(group), group_size, hashes=tuple(group)))
            group, group_size = [], 0

    for i, f in enumerate(files):
        if f.format == "parquet":
            flush()
            num_groups = check_parquet_schema(f, cfg)
            jobs.extend(_parquet_jobs(len(jobs), i, f, num_groups, unit_bytes))
            continue
        whole_docs = f.format == "txt" and cfg.txt_documents == "file"
        if whole_docs or f.size <= unit_bytes:
            group.append(i)
            group_size += f.size
            if group_size >= unit_bytes and (len(group) >= min_docs or not whole_docs):
                flush()
            continue
        flush()
        stream_size = f.size
        if f.format == "jsonl" and f.compressed:
            isize = gzip_uncompressed_size(f.path)
            splittable = isize is not None and isize <= cfg.gzip_split_max_bytes
            stream_size = isize if splittable else 0
        if f.format == "jsonl" and stream_size > unit_bytes:
            num = -(-stream_size // unit_bytes)
            # The last range is open-ended (end=0 means "to the end"): a compressed file's recorded size is a
            # hint, and no line may be lost if it is off.
            bounds = [stream_size * k // num for k in range(num + 1)]
            for k in range(num):
                hashes = (i,) if k == 0 else ()
                end = bounds[k + 1] if k < num - 1 else 0
                jobs.append(Job(len(jobs), "range", (i,), bounds[k + 1] - bounds[k], bounds[k], end, (), hashes))
        else:
            jobs.append(Job(len(jobs), "stream", (i,), f.size, hashes=(i,)))
    flush()
    return jobs


def _parquet_jobs(first: int, file_index: int, f: InputFile, num_groups: int, unit_bytes: int) -> list[Job]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(f.path).metadata
    jobs: list[Job] = []
    run: list[int] = []
    run_size = 0
    for g in range(num_groups):
        run.append(g)
        run_size += meta.row_group(g).total_byte_size
        if run_size >= unit_bytes:
            jobs.append(Job(first + len(jobs), "parquet", (file_index,), run_size, row_groups=tuple(run)))
            run, run_size = [], 0
    if run or not jobs:
        jobs.append(Job(first + len(jobs), "parquet", (file_index,), run_size, row_groups=tuple(run)))
    # The job holding row group 0 records the file's hash.
    jobs[0] = Job(**{**asdict(jobs[0]), "hashes": (file_index,)})
    return jobs


def job_documents(job: Job, files: list[InputFile], cfg: InputConfig, stats: ReadStats) -> Iterator[Document]:
    if job.kind in ("files", "stream"):
        for i in job.files:
            yield from read_file(files[i], cfg, stats)
    elif job.kind == "range":
        f = files[job.files[0]]
        end = job.end or None
        ok = stats.counts["unreadable_files"]
        # An uncompressed file is seeked to the range (reading forward to it would make a large file's ranges
        # quadratic); messages then give byte offsets instead of line numbers.
        yield from guarded(f, read_jsonl(f, cfg, stats, job.start, end, seek=not f.compressed), stats)
        if end is None and stats.counts["unreadable_files"] == ok:
            stats.counts["files_read"] += 1  # counted once per file, by its last range
    elif job.kind == "parquet":
        f = files[job.files[0]]
        if job.row_groups:
            yield from guarded(f, read_parquet(f, cfg, stats, list(job.row_groups)), stats)
    else:  # pragma: no cover
        raise AssertionError(job.kind)


def iter_units(documents: Iterator[Document], unit_bytes: int, min_docs: int) -> Iterator[list[Document]]:
    """Cut a document stream into units of >= unit_bytes text and >= min_docs documents.

    A short tail is merged into the unit before it, so that every unit (but a job's only one) has enough other
    documents to draw BERT's random-next segments from. At most two units are held in memory.
    """
    pending: list[Document] | None = None
    current: list[Document] = []
    size = 0
    for doc in documents:
        current.append(doc)
        size += len(doc.text)
        if size >= unit_bytes and len(current) >= min_docs:
            if pending is not None:
                yield pending
            pending, current, size = current, [], 0
    if pending is not None and current and len(current) < min_docs:
        pending.extend(current)
        current = []
    if pending is not None:
        yield pending
    if current:
        yield current


def input_fingerprint(files: list[InputFile]) -> list[dict]:
    """Path, size and mtime of each input: cheap evidence that a resumed run reads the same data."""
    import os

    return [
        {
            "path": f.path,
            "format": f.format,
            "compressed": f.compressed,
            "size": f.size,
            "mtime_ns": os.stat(f.path).st_mtime_ns,
        }
        for f in files
    ]


def plan_fingerprint(content_config: dict, tokenizer_sha: str, inputs: list[dict], objective: str) -> str:
    blob = json.dumps(
        {"config": content_config, "tokenizer": tokenizer_sha, "inputs": inputs, "objective": objective}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()
