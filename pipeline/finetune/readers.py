"""Labelled examples from JSONL, CSV/TSV, Parquet, BIG-bench ``task.json``, SQuAD JSON and mail archives.

Every record keeps where it came from (``file:line``, ``file#row``, ``file#examples[i]``, ``archive/member``), so a
bad record is an error that names it: a missing field, a label outside ``task.labels``, a pair without its
separator. Fine-tuning sets are small, so everything is read into memory.

Formats (``data.*.format``, or from the file name; a ``.json`` file from its content):

- ``json``: one JSON array of objects (``[{"text": ..., "label": ...}, ...]``), fields as for ``jsonl``.
- ``jsonl``: one object per line; ``text_field`` / ``text_pair_field`` / ``label_field`` / ``choices_field``.
- ``csv`` / ``tsv``: with a header row (fields by name) or without (``header: false``, fields by column number).
  TSV is read without quote handling (quotes are text, as in the movie-review snippets).
- ``parquet``: columns by name.
- ``bigbench``: BIG-bench ``task.json``: ``examples[].input`` and ``target_scores`` (the label, or the choices of a
  multiple-choice item, is the key with the highest score).
- ``json_archive``: a tar(.gz) archive or a directory of one-record ``.json`` files (the SpamAssassin package).
- ``squad``: SQuAD v1.1 / v2.0 JSON (``data[].paragraphs[].qas[]``), read by :func:`read_squad`.
"""

from __future__ import annotations

import csv
import email
import email.policy
import gzip
import html
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.finetune.config import SourceConfig, TaskConfig


@dataclass
class TextExample:
    """A single text or a pair, with its class index (classification and pair classification)."""

    uid: str
    text: str
    text_pair: str | None
    label: int


@dataclass
class ChoiceExample:
    """A context and its choices; ``label`` is the index of the right one."""

    uid: str
    context: str
    choices: list[str]
    label: int


@dataclass
class SquadExample:
    qid: str
    title: str
    context: str
    question: str
    answers: list[dict] = field(default_factory=list)  # {"text", "answer_start"}; empty: no answer
    is_impossible: bool = False
    article: int = 0  # index of the article in its file (dev hold-out and SQuAD 2.0 emulation group by it)


# ---------------------------------------------------------------------------------------------------------
# Files and records


def detect_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if path.is_dir() or name.endswith((".tgz", ".tar")):
        return "json_archive"
    for suffix, fmt in ((".jsonl", "jsonl"), (".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return fmt
    if name.endswith(".json"):
        try:
            data = _load_json(path)
        except UserError:
            if _first_line_is_object(path):  # JSON Lines under a .json name
                return "jsonl"
            raise
        if isinstance(data, list):
            return "json"
        if isinstance(data, dict) and "examples" in data:
            return "bigbench"
        if isinstance(data, dict) and "data" in data:
            return "squad"
        what = f"an object with keys {', '.join(map(repr, list(data)[:8]))}" if isinstance(data, dict) else "a value"
        raise UserError(
            f"{path}: holds {what}, not a JSON array of records, a BIG-bench task (examples) or SQuAD (data); "
            "set data.train.format / data.dev.format"
        )
    raise UserError(f"{path}: cannot tell the format from the name; set data.train.format / data.dev.format")


def _first_line_is_object(path: Path) -> bool:
    with _open_text(path) as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def _load_json(path: Path):
    with _open_text(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None


def read_records(src: SourceConfig) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a non-SQuAD source, in file order."""
    path = Path(src.path)
    if not path.exists():
        raise UserError(f"{src.path}: no such data file")
    fmt = src.format if src.format != "auto" else detect_format(path)
    if fmt == "json":
        yield from _json_array_records(path)
    elif fmt == "jsonl":
        with _open_text(path) as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    hint = " (one JSON array of records is format json)" if line.lstrip().startswith("[") else ""
                    raise UserError(f"{path}:{line_no}: invalid JSON ({exc.msg}){hint}") from None
                if not isinstance(record, dict):
                    hint = "; a file holding one JSON array of records is format json" if line_no == 1 else ""
                    raise UserError(
                        f"{path}:{line_no}: a record must be a JSON object, got a {type(record).__name__}{hint}"
                    )
                yield f"{path}:{line_no}", record
    elif fmt in ("csv", "tsv"):
        with _open_text(path) as fh:
            if fmt == "tsv":
                reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(fh)
            names = None
            for row_no, row in enumerate(reader, 1):
                if names is None and src.header:
                    names = row
                    continue
                if not row:
                    continue
                keys = names if names is not None else [str(i) for i in range(len(row))]
                yield f"{path}:{row_no}", dict(zip(keys, row, strict=False))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        rows = (record for batch in pq.ParquetFile(path).iter_batches() for record in batch.to_pylist())
        for i, record in enumerate(rows):  # record batches: a large file is never held whole
            yield f"{path}#{i}", record
    elif fmt == "bigbench":
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
            raise UserError(f"{path}: not a BIG-bench task.json (no 'examples' list)")
        for i, record in enumerate(data["examples"]):
            yield f"{path}#examples[{i}]", record
    elif fmt == "json_archive":
        yield from _archive_records(path)
    elif fmt == "squad":
        raise UserError(f"{path}: SQuAD JSON is for task.kind squad")
    else:  # pragma: no cover - Literal-checked
        raise AssertionError(fmt)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_records(path: Path) -> Iterator[tuple[str, dict]]:
    """The objects of a file holding one JSON array, each with the line it starts on (``file:line``)."""
    with _open_text(path) as fh:
        text = fh.read()
    decoder = json.JSONDecoder()
    at = _JSON_SPACE.match(text, 0).end()
    if text[at : at + 1] != "[":
        found = {"{": "an object", "": "nothing"}.get(text[at : at + 1], "a value")
        raise UserError(f"{path}: format json is one JSON array of records ([{{...}}, ...]); the file holds {found}")
    line, counted = 1, 0
    at = _JSON_SPACE.match(text, at + 1).end()
    while text[at : at + 1] != "]":
        line += text.count("\n", counted, at)  # the line the record starts on
        counted = at
        try:
            record, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{line}: a record must be a JSON object, got a {type(record).__name__}")
        yield f"{path}:{line}", record
        at = _JSON_SPACE.match(text, end).end()
        if text[at : at + 1] == ",":
            at = _JSON_SPACE.match(text, at + 1).end()
        elif text[at : at + 1] != "]":
            where = text.count("\n", 0, at) + 1
            raise UserError(f"{path}:{where}: invalid JSON (expected ',' or ']' after a record)")


def _archive_records(path: Path) -> Iterator[tuple[str, dict]]:
    if path.is_dir():
        for member in sorted(path.rglob("*.json")):
            yield str(member), _load_json(member)
        return
    records = []
    with tarfile.open(path, "r|*") as tar:  # one sequential pass: random access into a .tgz re-reads it
        for m in tar:
            if m.isfile() and m.name.endswith(".json"):
                records.append((m.name, tar.extractfile(m).read()))
    for name, raw in sorted(records):
        try:
            record = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}/{name}: invalid JSON ({exc.msg})") from None
        yield f"{path}/{name}", record


# ---------------------------------------------------------------------------------------------------------
# Fields


def _field(record: dict, name: str, where: str, what: str):
    if name not in record:
        raise UserError(f"{where}: no {what} field {name!r} (fields: {', '.join(map(str, record))})")
    if record[name] is None:
        raise UserError(f"{where}: null {what} (field {name!r} is null)")
    return record[name]


def _best_key(scores: dict, where: str) -> str:
    if not isinstance(scores, dict) or not scores:
        raise UserError(f"{where}: target_scores must be a non-empty mapping")
    best = max(scores.values())
    keys = [k for k, v in scores.items() if v == best]
    if len(keys) != 1:
        raise UserError(f"{where}: target_scores has no single best answer ({keys})")
    return keys[0]


_HTML_BLOCKS = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAGS = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def email_text(raw: str) -> str:
    """Subject and decoded text body of a raw RFC 822 mail (text/plain preferred, else HTML without tags)."""
    try:
        msg = email.message_from_string(raw, policy=email.policy.default)
        subject = str(msg.get("Subject", "") or "")
        plain, rich = [], []
        for part in msg.walk():
            if part.is_multipart() or part.get_content_type() not in ("text/plain", "text/html"):
                continue
            encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
            try:
                if encoding in ("base64", "quoted-printable"):
                    content = part.get_content()
                else:  # already text: decoding would turn non-ASCII characters into "\\uXXXX" escapes
                    content = str(part.get_payload())
            except Exception:  # unknown charset, broken transfer encoding: take the bytes as Latin-1
                payload = part.get_payload(decode=True) or b""
                content = payload.decode("latin-1") if isinstance(payload, bytes) else str(payload)
            (plain if part.get_content_type() == "text/plain" else rich).append(content)
        body = "\n".join(plain) if plain else "\n".join(html.unescape(_HTML_TAGS.sub(" ", _HTML_BLOCKS.sub(" ", r)))
                                                        for r in rich)  # fmt: skip
    except Exception:  # a mail the parser cannot take at all: the text after the header block
        subject, _, body = "", *raw.partition("\n\n")[1:]
    text = f"{subject}\n{body}"
    return _BLANK_LINES.sub("\n", _SPACES.sub(" ", text)).strip()


def _text(record: dict, name: str, where: str, src: SourceConfig) -> str:
    value = _field(record, name, where, "text")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} is not text ({type(value).__name__})")
    return email_text(value) if src.text_format == "email" else value


def _label(record: dict, where: str, src: SourceConfig, labels: list[str]) -> int:
    if "target_scores" in record:  # BIG-bench
        raw = _best_key(record["target_scores"], where)
    else:
        raw = _field(record, src.label_field, where, "label")
    if src.label_threshold is not None:
        try:
            raw = labels[1] if float(raw) > src.label_threshold else labels[0]
        except (TypeError, ValueError):
            raise UserError(f"{where}: label {raw!r} is not a number (data.*.label_threshold is set)") from None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)  # JSON 1.0 and YAML / CSV "1" name the same class
    raw = str(raw)  # label_map keys and task.labels are text: JSON 0 and true match "0" and "True"
    raw = src.label_map.get(raw, raw)
    if raw not in labels:
        raise UserError(f"{where}: label {raw!r} is not one of task.labels {labels}")
    return labels.index(raw)


def text_examples(src: SourceConfig, task: TaskConfig) -> list[TextExample]:
    """Classification (one text) or pair-classification (two texts) examples."""
    pair = task.kind == "pair_classification"
    field_name = "input" if src.format == "bigbench" or _is_bigbench(src) else src.text_field
    out = []
    for where, record in read_records(src):
        text = _text(record, field_name, where, src)
        text_pair = None
        if pair and src.text_pair_field:
            text_pair = _text(record, src.text_pair_field, where, src)
        elif pair:
            if not src.pair_separator or src.pair_separator not in text:
                raise UserError(
                    f"{where}: no second text: set data.*.text_pair_field, or data.*.pair_separator to a string "
                    f"that splits the text (looked for {src.pair_separator!r})"
                )
            text, text_pair = text.split(src.pair_separator, 1)
        out.append(TextExample(where, text, text_pair, _label(record, where, src, task.labels)))
    return out


def _is_bigbench(src: SourceConfig) -> bool:
    return src.format == "auto" and detect_format(Path(src.path)) == "bigbench"


def choice_examples(src: SourceConfig, task: TaskConfig) -> list[ChoiceExample]:
    out = []
    bigbench = src.format == "bigbench" or _is_bigbench(src)
    for where, record in read_records(src):
        if bigbench:
            context = _text(record, "input", where, src)
            choices = [str(c) for c in _field(record, "target_scores", where, "target_scores")]
            label = choices.index(_best_key(record["target_scores"], where))
        else:
            context = _text(record, src.text_field, where, src)
            choices = _field(record, src.choices_field, where, "choices")
            if not isinstance(choices, list) or len(choices) < 2:
                raise UserError(f"{where}: {src.choices_field!r} must be a list of at least two choices")
            choices = [str(c) for c in choices]
            raw = _field(record, src.label_field, where, "label")
            if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(choices):
                label = raw
            elif str(raw) in choices:
                label = choices.index(str(raw))
            else:
                raise UserError(f"{where}: label {raw!r} is neither a choice index nor one of the choices")
        out.append(ChoiceExample(where, context, choices, label))
    return out


def read_squad(src: SourceConfig) -> list[SquadExample]:
    """Every question of a SQuAD v1.1 / v2.0 file (answers unchecked here: see ``squad.answer_span``)."""
    path = Path(src.path)
    if not path.exists():
        raise UserError(f"{src.path}: no such data file")
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"{path}: not SQuAD JSON (no 'data' list of articles)")
    out = []
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise UserError(f"{path}#data[{a}].paragraphs[{p}]: no context")
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}#data[{a}].paragraphs[{p}].qas[{q}]"
                question = _field(qa, "question", where, "question")
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else list(qa.get("answers", []))
                if not impossible and not answers:
                    raise UserError(f"{where}: no answers and not marked is_impossible")
                out.append(
                    SquadExample(
                        str(qa.get("id", where)),
                        str(article.get("title", a)),
                        context,
                        question,
                        answers,
                        impossible,
                        a,
                    )
                )
    return out
