"""Writing a unit's shards atomically, and the completion records that make a run resumable.

A unit's shards are written by webdataset's ShardWriter under ``.tmp/``; each file is hashed while it is
written. When the unit is complete its shards are renamed into the output directory and then its record
``.records/unit-<job>-<unit>.json`` is written (temporary name + rename): the record is the commit point. A job
record follows once all its units are committed. On a re-run, a unit whose record exists and whose shards still
match it is kept; anything else is removed and redone. A killed run therefore never leaves a partial shard that
a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import webdataset as wds

from pipeline.tokenizer.spm import sha256_file

TMP_DIR = ".tmp"
RECORDS_DIR = ".records"


class _HashingFile:
    """A write-only file that hashes what goes through it (so a shard is never read back to be hashed)."""

    def __init__(self, path: str):
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by ShardWriter's post callback
        self._sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self._sha.update(data)
        self.bytes += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> str:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._sha.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class UnitShardWriter:
    """ShardWriter for one unit: ``<objective>-<job>-<unit>-<part>.tar``, at most ``maxcount`` samples each."""

    def __init__(self, out_dir: Path, prefix: str, maxcount: int):
        self.out_dir = out_dir
        self.tmp_dir = out_dir / TMP_DIR
        self.prefix = prefix
        self.maxcount = maxcount
        self.shards: list[dict] = []
        self._writer: wds.ShardWriter | None = None
        self._files: dict[str, _HashingFile] = {}
        self._counts: dict[str, list[int]] = {}

    def _open(self, fname: str) -> _HashingFile:
        f = _HashingFile(fname)
        self._files[fname] = f
        self._counts[fname] = [0, 0]
        return f

    def _post(self, fname: str) -> None:
        f = self._files.pop(fname)
        sha = f.close()
        samples, tokens = self._counts.pop(fname)
        self.shards.append(
            {"name": os.path.basename(fname), "samples": samples, "tokens": tokens, "bytes": f.bytes, "sha256": sha}
        )

    def write(self, sample: dict, num_tokens: int) -> None:
        if self._writer is None:  # created lazily: a unit without samples writes no empty shard
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self._writer = wds.ShardWriter(
                str(self.tmp_dir / f"{self.prefix}-%03d.tar"),
                maxcount=self.maxcount,
                maxsize=float("inf"),
                post=self._post,
                verbose=0,
                opener=self._open,
                encoder=False,  # samples arrive as bytes (see samples.py)
                mtime=0,  # fixed header times: the same samples give byte-identical shards
            )
        self._writer.write(sample)
        counts = self._counts[self._writer.fname]
        counts[0] += 1
        counts[1] += num_tokens

    def commit(self) -> list[dict]:
        """Close the last shard and move every shard of the unit into the output directory."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for shard in self.shards:
            os.replace(self.tmp_dir / shard["name"], self.out_dir / shard["name"])
        return self.shards


def unit_record_path(out_dir: Path, stem: str) -> Path:
    return out_dir / RECORDS_DIR / f"unit-{stem}.json"


def job_record_path(out_dir: Path, job_stem: str) -> Path:
    return out_dir / RECORDS_DIR / f"job-{job_stem}.json"


def shards_intact(out_dir: Path, shards: list[dict], verify_hash: bool) -> bool:
    for shard in shards:
        path = out_dir / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            return False
        if verify_hash and sha256_file(path) != shard["sha256"]:
            return False
    return True


def load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def remove_unit_outputs(out_dir: Path, prefix: str) -> None:
    """Delete whatever an interrupted attempt left of a unit (final-named shards, temporaries, record)."""
    for directory in (out_dir, out_dir / TMP_DIR):
        if directory.is_dir():
            for path in directory.glob(f"{prefix}-*.tar"):
                path.unlink()
