"""Document readers shared by the tokenizer trainer and the sharder.

``--input`` takes files, directories (searched recursively) and globs, mixed. Formats, by file name:

- ``.txt`` / ``.txt.gz``: one document per file, or (``input.txt_documents: blank_lines``) documents separated
  by blank lines.
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the text in ``input.jsonl_field`` (``text``).
- ``.parquet``: the ``input.parquet_column`` (``text``) column, read in record batches through pyarrow, never
  the whole file at once.

Nothing is dropped silently: every skipped file or document is counted in ``ReadStats`` with its reason, and
the files it concerns are listed (up to a cap) so that the final report says which.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import option
from pipeline.errors import UserError

# Longest suffix first: ".jsonl.gz" must win over ".gz".
SUFFIX_FORMATS: dict[str, tuple[str, bool]] = {
    ".jsonl.gz": ("jsonl", True),
    ".txt.gz": ("txt", True),
    ".jsonl": ("jsonl", False),
    ".txt": ("txt", False),
    ".parquet": ("parquet", False),
}
MAX_LISTED_PER_FILE = 5  # detail lines kept per file in the report; the counts are always complete


@dataclass
class InputConfig:
    """Where the raw documents are and how to read them."""

    paths: list[str] = option([], "input files, directories and globs (mixed)", aliases=("--input",), path=True)
    txt_documents: Literal["file", "blank_lines"] = option(
        "file", "a .txt file is one document (file) or holds documents separated by blank lines (blank_lines)"
    )
    jsonl_field: str = option("text", "the JSON field holding a document's text in .jsonl inputs")
    parquet_column: str = option("text", "the column holding a document's text in .parquet inputs")
    parquet_batch_rows: int = option(1024, "rows per pyarrow record batch when streaming parquet files")
    gzip_split_max_bytes: int = option(
        16 << 20,
        "split .jsonl.gz files up to this decompressed size over several workers (each skips to its range);"
        " larger ones are read by one worker",
    )
    on_decode_error: Literal["replace", "skip"] = option(
        "replace", "non-UTF-8 bytes: decode with U+FFFD and count the file (replace), or skip it with a reason (skip)"
    )

    def __post_init__(self) -> None:
        if self.parquet_batch_rows < 1:
            raise ValueError("input.parquet_batch_rows must be >= 1")


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # txt | jsonl | parquet
    compressed: bool
    size: int


@dataclass
class Document:
    text: str
    source: str  # "path" or "path:line" / "path#row": where a sample came from
    path: str = ""  # the input file
    offset: int = 0  # where it starts in the file (decompressed byte, Parquet row; 0 for whole files): its identity


@dataclass
class ReadStats:
    """Counts of what was read and what was skipped, with the files concerned. Mergeable and JSON-able."""

    counts: Counter = field(default_factory=Counter)
    file_issues: dict[str, list[str]] = field(default_factory=dict)

    def issue(self, path: str, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        notes = self.file_issues.setdefault(path, [])
        if len(notes) < MAX_LISTED_PER_FILE:
            notes.append(f"{kind}: {detail}" if detail else kind)

    def merge(self, other: ReadStats) -> None:
        self.counts.update(other.counts)
        for path, notes in other.file_issues.items():
            mine = self.file_issues.setdefault(path, [])
            mine.extend(notes[: max(0, MAX_LISTED_PER_FILE - len(mine))])

    def to_json(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "file_issues": dict(sorted(self.file_issues.items()))}

    @classmethod
    def from_json(cls, data: dict) -> ReadStats:
        return cls(Counter(data.get("counts", {})), {k: list(v) for k, v in data.get("file_issues", {}).items()})


def file_format(path: str) -> tuple[str, bool] | None:
    name = path.lower()
    for suffix, fmt in SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None


def resolve_inputs(patterns: list[str]) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """Expand files, directories and globs into a sorted, de-duplicated file list.

    Returns the files and the (path, reason) of directory entries that were not read (unsupported formats).
    Every argument must match something, and explicitly named files must have a supported format: both are
    checked before any work starts.
    """
    if not patterns:
        raise UserError("no input given: pass --input PATH... (files, directories or globs)")
    missing: list[str] = []
    unsupported: list[str] = []
    ignored: list[tuple[str, str]] = []
    found: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matched = False
            for root, dirs, names in os.walk(pattern):
                dirs.sort()
                for name in sorted(names):
                    path = os.path.join(root, name)
                    if file_format(path):
                        found.append(path)
                        matched = True
                    elif not name.startswith("."):
                        ignored.append((path, "unsupported format (not .txt, .jsonl[.gz], .txt.gz, .parquet)"))
            if not matched:
                missing.append(f"{pattern} (a directory with no .txt/.jsonl/.jsonl.gz/.parquet files)")
        elif os.path.isfile(pattern):
            (found if file_format(pattern) else unsupported).append(pattern)
        elif glob.has_magic(pattern):
            hits = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not hits:
                missing.append(f"{pattern} (glob matched nothing)")
            for path in hits:
                if file_format(path):
                    found.append(path)
                else:
                    ignored.append((path, "unsupported format (not .txt, .jsonl[.gz], .txt.gz, .parquet)"))
        else:
            missing.append(f"{pattern} (no such file or directory)")
    problems = [f"input not found: {m}" for m in missing]
    problems += [f"unsupported input format: {u} (use .txt[.gz], .jsonl[.gz] or .parquet)" for u in unsupported]
    if problems:
        raise UserError("; ".join(problems))
    files: list[InputFile] = []
    seen: set[str] = set()
    for path in found:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        fmt, compressed = file_format(path)  # type: ignore[misc]
        files.append(InputFile(path=path, format=fmt, compressed=compressed, size=os.path.getsize(path)))
    if not files:
        raise UserError(f"no readable input files in: {' '.join(patterns)}")
    return files, ignored


# ---------------------------------------------------------------------------------------------------------
# Decoding


def decode(raw: bytes, path: str, cfg: InputConfig, stats: ReadStats, where: str = "") -> str | None:
    """UTF-8 decode; on bad bytes replace (counted) or skip (counted), as configured."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cfg.on_decode_error == "skip":
            stats.issue(path, "skipped_non_utf8", f"{where}byte {exc.start}".strip())
            return None
        stats.issue(path, "decoded_with_replacement", f"{where}byte {exc.start}".strip())
        return raw.decode("utf-8", errors="replace")


def open_binary(f: InputFile):
    return gzip.open(f.path, "rb") if f.compressed else open(f.path, "rb")


# ---------------------------------------------------------------------------------------------------------
# Per-format readers. Each yields Documents and records every skip in `stats`.


def _emit(text: str | None, source: str, path: str, stats: ReadStats, offset: int = 0) -> Iterator[Document]:
    if text is None:
        return
    if not text.strip():
        stats.issue(path, "empty_documents", source)
        return
    stats.counts["documents"] += 1
    yield Document(text=text, source=source, path=path, offset=offset)


def read_txt(f: InputFile, cfg: InputConfig, stats: ReadStats, start: int = 0) -> Iterator[Document]:
    """Whole file, or (``blank_lines``) its documents; with ``start > 0`` only those after the first blank line
    at or after byte ``start`` (an uncompressed file is seeked; line numbers are then unknown and sources carry
    byte offsets)."""
    if cfg.txt_documents == "file":
        with open_binary(f) as fh:
            raw = fh.read()
        stats.counts["bytes"] += len(raw)
        yield from _emit(decode(raw, f.path, cfg, stats), f.path, f.path, stats)
        return
    # blank_lines: stream line by line so that a huge file never sits in memory whole.
    buf: list[str] = []
    start_line = doc_start = 0
    with open_binary(f) as fh:
        pos, lineno, skipping = _skip_to(fh, f, start), 1, start > 0
        for raw in fh:
            line_pos = pos
            pos += len(raw)
            lineno += 1
            if skipping:  # inside the document that straddles `start`: wait for a blank line
                skipping = bool(raw.strip())
                continue
            stats.counts["bytes"] += len(raw)
            line = decode(raw, f.path, cfg, stats, f"line {lineno - 1} ")
            if line is None or line.strip():
                if line is not None:
                    if not buf:
                        start_line, doc_start = lineno - 1, line_pos
                    buf.append(line)
                continue
            if buf:
                yield from _emit("".join(buf), _where(f, start, start_line, doc_start), f.path, stats, doc_start)
                buf = []
    if buf:
        yield from _emit("".join(buf), _where(f, start, start_line, doc_start), f.path, stats, doc_start)


def _skip_to(fh, f: InputFile, start: int) -> int:
    """Position ``fh`` at ``start`` (a seek, or for a compressed file reading and discarding); returns it."""
    if start <= 0:
        return 0
    if not f.compressed:
        fh.seek(start)
        return start
    pos = 0
    while pos < start:
        chunk = fh.read(min(start - pos, 1 << 22))
        if not chunk:
            break
        pos += len(chunk)
    return pos


def _where(f: InputFile, start: int, lineno: int, offset: int) -> str:
    """A document's source: ``path:line`` when lines were counted from the top, else ``path@byte``."""
    return f"{f.path}:{lineno}" if start <= 0 else f"{f.path}@{offset}"


def _jsonl_document(
    raw: bytes, lineno: int, f: InputFile, cfg: InputConfig, stats: ReadStats, offset: int = 0, source: str = ""
) -> Iterator[Document]:
    if not raw.strip():
        return  # blank lines between records are not documents
    line = decode(raw, f.path, cfg, stats, f"line {lineno} ")
    if line is None:
        return
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        stats.issue(f.path, "invalid_json_lines", f"line {lineno}: {exc.msg}")
        return
    if not isinstance(record, dict) or cfg.jsonl_field not in record:
        stats.issue(f.path, "missing_text_field", f"line {lineno}: no field {cfg.jsonl_field!r}")
        return
    text = record[cfg.jsonl_field]
    if not isinstance(text, str):
        stats.issue(f.path, "non_string_text", f"line {lineno}: {cfg.jsonl_field!r} is {type(text).__name__}")
        return
    yield from _emit(text, source or f"{f.path}:{lineno}", f.path, stats, offset)


def read_jsonl(
    f: InputFile, cfg: InputConfig, stats: ReadStats, start: int = 0, end: int | None = None, seek: bool = False
):
    """Whole file, or the lines whose first byte lies in ``[start, end)``.

    Offsets are in the decompressed stream for ``.jsonl.gz``: a range job of a compressed file decompresses
    and discards the bytes before its range (the planner only splits compressed files that are small enough
    for this to be cheaper than reading them in one worker). ``seek``: jump to ``start`` without counting the
    lines before it (an uncompressed file is seeked); sources then carry byte offsets (``path@byte``).
    """
    with open_binary(f) as fh:
        lineno = 1
        pos = 0
        if start > 0 and seek:
            pos = _skip_to(fh, f, start - 1)
            lineno = 0  # unknown
        elif start > 0:
            # Advance to start - 1 reading forward (gzip streams cannot jump); line numbers are only for
            # messages, and counting newlines in the skipped bytes is one C-level pass.
            while pos < start - 1:
                chunk = fh.read(min(start - 1 - pos, 1 << 22))
                if not chunk:
                    break
                lineno += chunk.count(b"\n")
                pos += len(chunk)
        if start > 0:
            # A line that started before `start` belongs to the previous range: skip to the next line start.
            rest = fh.readline()
            lineno += rest.count(b"\n")
            pos += len(rest)
        while end is None or pos < end:
            raw = fh.readline()
            if not raw:
                break
            source = f"{f.path}@{pos}" if lineno <= 0 else ""
            stats.counts["bytes"] += len(raw)
            yield from _jsonl_document(raw, lineno, f, cfg, stats, pos, source)
            pos += len(raw)
            if lineno > 0:
                lineno += 1


def gzip_uncompressed_size(path: str) -> int | None:
    """The size recorded in a gzip trailer (ISIZE, modulo 2**32), or None if it cannot be trusted."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")
        compressed = os.path.getsize(path)
    except OSError:
        return None
    # Past 4 GiB the field wraps; a result smaller than the compressed file means it did (or the file is odd).
    return isize if compressed < (1 << 32) and isize >= compressed // 2 else None


def read_parquet(
    f: InputFile, cfg: InputConfig, stats: ReadStats, row_groups: list[int] | None = None, skip_rows: int = 0
):
    """The text column of the given row groups (all by default), after the first ``skip_rows`` of them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f.path)
    groups = list(range(pf.num_row_groups)) if row_groups is None else row_groups
    row = sum(pf.metadata.row_group(i).num_rows for i in range(groups[0])) if groups else 0
    for batch in pf.iter_batches(batch_size=cfg.parquet_batch_rows, row_groups=groups, columns=[cfg.parquet_column]):
        if skip_rows >= batch.num_rows:  # whole batches are skipped without converting them to Python
            skip_rows -= batch.num_rows
            row += batch.num_rows
            continue
        column = batch.column(0)
        row += skip_rows
        for value in column.to_pylist()[skip_rows:]:
            source = f"{f.path}#{row}"
            row += 1
            if value is None:
                stats.issue(f.path, "null_text", f"row {row - 1}")
                continue
            if isinstance(value, bytes):
                value = decode(value, f.path, cfg, stats, f"row {row - 1} ")
            stats.counts["bytes"] += len(value) if value else 0
            yield from _emit(value, source, f.path, stats, row - 1)
        skip_rows = 0


def check_parquet_schema(f: InputFile, cfg: InputConfig) -> int:
    """Fail before any work if the text column is missing; return the number of row groups."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"cannot read parquet file {f.path}: {exc}") from None
    names = pf.schema_arrow.names
    if cfg.parquet_column not in names:
        raise UserError(
            f"{f.path}: no column {cfg.parquet_column!r} (columns: {', '.join(names)}); set --input.parquet_column"
        )
    return pf.num_row_groups


READ_ERRORS = (OSError, EOFError, gzip.BadGzipFile, io.UnsupportedOperation)


def guarded(f: InputFile, documents: Iterator[Document], stats: ReadStats) -> Iterator[Document]:
    """Pass documents through; a read error ends the file with a reported reason instead of the whole run.

    Documents already read from a file that breaks later are kept (they are valid); the report names the file.
    """
    try:
        yield from documents
    except READ_ERRORS as exc:
        stats.issue(f.path, "unreadable_files", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # pyarrow's errors for corrupt files have no common base we can name
        if type(exc).__module__.startswith("pyarrow"):
            stats.issue(f.path, "unreadable_files", f"{type(exc).__name__}: {exc}")
        else:
            raise


def read_file(f: InputFile, cfg: InputConfig, stats: ReadStats) -> Iterator[Document]:
    """All documents of one file; an unreadable file is skipped with its reason, never silently."""
    if f.format == "txt":
        documents = read_txt(f, cfg, stats)
    elif f.format == "jsonl":
        documents = read_jsonl(f, cfg, stats)
    else:
        documents = read_parquet(f, cfg, stats)
    ok = stats.counts["unreadable_files"]
    yield from guarded(f, documents, stats)
    if stats.counts["unreadable_files"] == ok:
        stats.counts["files_read"] += 1
