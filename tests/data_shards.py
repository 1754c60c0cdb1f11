"""Shard sets for the data-loader tests: real shards of part of the bundled corpus, built once per session.

The test modules of the loader each declare session fixtures that call :func:`build_shards`; the shards are
cached under pytest's session directory, so each set is written once however many modules use it.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import webdataset as wds
from conftest import DEMO_CORPUS

from pipeline.config import build_config
from pipeline.preprocess.config import ShardJobConfig
from pipeline.preprocess.sharder import run_sharding

NUM_DOCS = 40  # of the 123 addresses: ~4,000 BERT samples at seq 128, enough for statistics, fast to read


def corpus_subset(root: Path) -> Path:
    path = root / "corpus-subset.jsonl.gz"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as src:
            lines = [line for _, line in zip(range(NUM_DOCS), src, strict=False)]
        with gzip.open(path, "wt", encoding="utf-8") as dst:
            dst.writelines(lines)
    return path


def build_shards(root: Path, tokenizer: Path, name: str, **overrides) -> Path:
    """Shards of the corpus subset under ``root/name`` (reused when already there)."""
    out = root / name
    if (out / "manifest.json").is_file():
        return out
    values = {
        "input.paths": [str(corpus_subset(root))],
        "data.tokenizer": str(tokenizer),
        "output.dir": str(out),
        "data.unit_bytes": 128 * 1024,
        # Small shards of uneven sizes: units end where their text does, and a unit's last shard is partial.
        "output.samples_per_shard": 300,
        **overrides,
    }
    run_sharding(build_config(ShardJobConfig, None, values))
    return out


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def keys_by_shard(directory: Path) -> dict[str, list[str]]:
    """Every shard's sample keys in tar order (read with plain webdataset, independently of the loader)."""
    out = {}
    for entry in manifest(directory)["shards"]:
        path = directory / entry["name"]
        out[entry["name"]] = [
            s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, empty_check=False)
        ]
    return out
