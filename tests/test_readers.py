"""Readers: formats, inputs given as files/dirs/globs, ranges, and every bad-input case counted."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.text.readers import InputConfig, InputFile, ReadStats, read_file, read_jsonl, resolve_inputs


def _docs(paths, **kw):
    files, ignored = resolve_inputs([str(p) for p in paths])
    stats = ReadStats()
    cfg = InputConfig(**kw)
    docs = [d for f in files for d in read_file(f, cfg, stats)]
    return docs, stats, ignored


def test_txt_file_and_blank_line_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one doc.\n\nstill the same doc.\n")
    (tmp_path / "b.txt").write_text("first.\nmore first.\n\n\nsecond doc.\n")
    docs, _, _ = _docs([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert len(docs) == 2
    docs, _, _ = _docs([tmp_path / "b.txt"], txt_documents="blank_lines")
    assert [d.text for d in docs] == ["first.\nmore first.\n", "second doc.\n"]
    assert docs[1].source.endswith("b.txt:5")


def test_jsonl_gz_parquet_and_mixed_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text(
        json.dumps({"text": "j1"}) + "\n" + json.dumps({"body": "j2", "text": "j3"}) + "\n"
    )
    with gzip.open(tmp_path / "d" / "y.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "g1"}) + "\n")
    (tmp_path / "d" / "notes.md").write_text("ignored")
    table = pa.table({"text": [f"p{i}" for i in range(10)], "id": list(range(10))})
    pq.write_table(table, tmp_path / "z.parquet", row_group_size=3)
    (tmp_path / "w.txt").write_text("t1")
    docs, stats, ignored = _docs([tmp_path / "d", tmp_path / "*.parquet", tmp_path / "w.txt"], parquet_batch_rows=4)
    assert [d.text for d in docs] == ["j1", "j3", "g1", *[f"p{i}" for i in range(10)], "t1"]
    assert [p for p, _ in ignored] == [str(tmp_path / "d" / "notes.md")]
    assert stats.counts["files_read"] == 4


def test_missing_and_unsupported_inputs_fail_before_work(tmp_path):
    (tmp_path / "ok.txt").write_text("x")
    (tmp_path / "bad.csv").write_text("x")
    with pytest.raises(UserError) as exc:
        resolve_inputs(
            [str(tmp_path / "ok.txt"), str(tmp_path / "nope.txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "bad.csv")]
        )
    message = str(exc.value)
    assert "nope.txt (no such file" in message and "glob matched nothing" in message and "bad.csv" in message


def test_bad_input_is_counted_never_silent(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("   \n\n")
    lines = ['{"text": "good"}', "{not json", '{"other": 1}', '{"text": 5}', "", '{"text": "  "}']
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-30])
    docs, stats, _ = _docs(sorted(tmp_path.iterdir()))
    texts = [d.text for d in docs]
    assert "caf\ufffd au lait" in texts and "good" in texts
    c = stats.counts
    assert c["decoded_with_replacement"] == 1
    assert c["empty_documents"] == 2  # the blank .txt file and the blank JSON text
    assert c["invalid_json_lines"] == 1 and c["missing_text_field"] == 1 and c["non_string_text"] == 1
    assert c["unreadable_files"] == 1
    assert any("line 2" in n for n in stats.file_issues[str(tmp_path / "mixed.jsonl")])
    assert str(tmp_path / "broken.jsonl.gz") in stats.file_issues
    docs, stats, _ = _docs([tmp_path / "latin1.txt"], on_decode_error="skip")
    assert docs == [] and stats.counts["skipped_non_utf8"] == 1


def test_parquet_missing_column_is_an_error(tmp_path):
    from pipeline.text.readers import check_parquet_schema

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    f = InputFile(str(tmp_path / "t.parquet"), "parquet", False, 1)
    with pytest.raises(UserError, match="no column 'text'"):
        check_parquet_schema(f, InputConfig())


@pytest.mark.parametrize("compressed", [False, True])
def test_jsonl_ranges_cover_every_line_exactly_once(tmp_path, compressed):
    lines = [json.dumps({"text": f"doc {i} " + "x" * (i * 7 % 50)}) for i in range(300)]
    raw = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("r.jsonl.gz" if compressed else "r.jsonl")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    f = InputFile(str(path), "jsonl", compressed, path.stat().st_size)
    for num in (1, 2, 3, 7, 50):
        bounds = [len(raw) * k // num for k in range(num + 1)]
        got = []
        for k in range(num):
            stats = ReadStats()
            end = None if k == num - 1 else bounds[k + 1]
            got += [(d.text, d.source, d.offset) for d in read_jsonl(f, InputConfig(), stats, bounds[k], end)]
            # Seeking (what the sharder does in an uncompressed file) reads the same lines.
            sought = [(d.text, d.offset) for d in read_jsonl(f, InputConfig(), stats, bounds[k], end, seek=True)]
            assert sought == [(t, o) for t, _, o in got[len(got) - len(sought) :]]
        assert [t for t, _, _ in got] == [json.loads(line)["text"] for line in lines]
        assert [s for _, s, _ in got] == [f"{path}:{i + 1}" for i in range(300)]  # line numbers survive the split
        starts = [0, *np.cumsum([len(line) + 1 for line in lines])[:-1]]
        assert [o for _, _, o in got] == starts  # each document's offset is its line's first byte


def test_a_range_of_a_large_jsonl_reads_its_range_not_the_file_before_it(tmp_path, monkeypatch):
    """At scale a file has thousands of ranges: reading forward to each would read the file quadratically."""
    from pipeline.preprocess import plan
    from pipeline.text import readers

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " + "x" * 90}) + "\n" for i in range(3000)))
    read = {"bytes": 0}

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def read(self, *args):
            data = self.fh.read(*args)
            read["bytes"] += len(data)
            return data

        def readline(self, *args):
            data = self.fh.readline(*args)
            read["bytes"] += len(data)
            return data

    def counting_open(path, mode="r", *args, **kwargs):
        return Counting(open(path, mode, *args, **kwargs))  # closed by Counting.__exit__

    monkeypatch.setattr(readers, "open", counting_open, raising=False)
    cfg = InputConfig()
    files, _ = resolve_inputs([str(path)])
    jobs = plan.plan_jobs(files, cfg, unit_bytes=16 * 1024, min_docs=2)
    assert len(jobs) > 15 and all(j.kind == "range" for j in jobs)
    last = jobs[-1]
    docs = list(plan.job_documents(last, files, cfg, ReadStats()))
    assert docs and docs[-1].text.startswith("document 2999 ")
    assert read["bytes"] < 2 * last.size  # its own range (and the line it starts in), not the 300 KB before it


def test_range_jobs_cover_the_file_with_positive_sizes(tmp_path):
    from pipeline.preprocess.plan import plan_jobs

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5000)))
    files, _ = resolve_inputs([str(path)])
    jobs = plan_jobs(files, InputConfig(), unit_bytes=8 * 1024, min_docs=2)
    # The last range is open-ended (end 0) but its size is what it holds: the work is scheduled by size.
    assert all(j.size > 0 for j in jobs) and sum(j.size for j in jobs) == path.stat().st_size
    assert jobs[-1].end == 0 and jobs[-1].start + jobs[-1].size == path.stat().st_size
