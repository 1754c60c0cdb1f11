"""``manifest.json``: the one file downstream stages read to know what a shard directory holds.

It lists every shard (samples, tokens, bytes, sha256), the totals, the objective, seq_len, seed, token dtype,
the tokenizer's sha256, the resolved content config, the input files with sizes and hashes, and the statistics
of the run (documents, skips with reasons, sentences, NSP balance, length histogram).

The manifest is built only from the per-job records, in job order, so the same inputs and config give the same
manifest whether one task wrote everything or many tasks wrote parts that ``merge`` joined. Timings and worker
counts are not in it (they are in ``report.json``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipeline.errors import UserError
from pipeline.preprocess.records import job_record_path, load_record, unit_record_path, write_json_atomic
from pipeline.text.readers import ReadStats

MANIFEST = "manifest.json"
PLAN = ".plan.json"
PARTS_DIR = "parts"
FORMAT = "pipeline-shards/1"

SUMMED_STATS = (
    "documents",
    "sentences",
    "single_sentence_documents",
    "single_sentence_pairs",
    "documents_without_tokens",
    "input_tokens",
    "samples",
    "tokens",
    "random_next",
    "truncated_pairs",
    "truncated_tokens",
    "random_next_same_document",
    "random_next_same_unit",
    "random_next_same_file",
    "random_next_other_file",
    "random_next_fallback_units",
    "random_next_pool_documents",
    "random_next_pool_tokens",
    "empty_segment_pairs",
    "tail_tokens_dropped",
)


def job_entry(out_dir: Path, job_record: dict) -> dict:
    """A job record with its units' shards and stats inlined (what a part manifest stores per job)."""
    units = []
    for stem in job_record["units"]:
        record = load_record(unit_record_path(out_dir, stem))
        if record is None:
            raise UserError(f"{out_dir}: unit {stem} has no completion record; re-run the shard command to redo it")
        units.append(record)
    return {**job_record, "unit_records": units}


def completed_job(out_dir: Path, job_stem: str) -> dict | None:
    return load_record(job_record_path(out_dir, job_stem))


def _sum_histograms(histograms: list[list[int]]) -> list[int]:
    size = max((len(h) for h in histograms), default=0)
    total = [0] * size
    for h in histograms:
        for i, c in enumerate(h):
            total[i] += c
    return total


def build_manifest(plan: dict, entries: list[dict], header: dict) -> dict:
    """Join job entries (from one or many tasks) into the final manifest; every planned job must be present."""
    by_job = {e["job"]: e for e in entries}
    missing = [j for j in range(len(plan["jobs"])) if j not in by_job]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise UserError(f"{len(missing)} of {len(plan['jobs'])} jobs are not complete (jobs {shown})")
    shards: list[dict] = []
    stats: Counter = Counter()
    histograms: list[list[int]] = []
    read = ReadStats()
    inputs: dict[int, dict] = {}
    long_cuts = 0
    for j in range(len(plan["jobs"])):
        entry = by_job[j]
        for unit in entry["unit_records"]:
            for shard in unit["shards"]:
                shards.append({**shard, "unit": unit["unit"]})
            unit_stats = unit["stats"]
            stats.update({k: unit_stats[k] for k in SUMMED_STATS if k in unit_stats})
            histograms.append(unit_stats["length_histogram"])
        read.merge(ReadStats.from_json(entry["read"]))
        long_cuts += entry.get("long_sentences_cut", 0)
        for item in entry["inputs"]:
            inputs[item["index"]] = item
    files = plan["files"]
    input_list = [
        {"path": f["path"], "format": f["format"], "bytes": f["size"], "sha256": inputs.get(i, {}).get("sha256")}
        for i, f in enumerate(files)
    ]
    totals = {
        "shards": len(shards),
        "samples": sum(s["samples"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
    }
    run_stats = {k: stats.get(k, 0) for k in SUMMED_STATS if k in stats}
    run_stats["long_sentences_cut"] = long_cuts
    run_stats["read"] = read.to_json()
    run_stats["ignored_paths"] = plan.get("ignored", [])
    run_stats["length_histogram"] = _sum_histograms(histograms)
    return {
        "format": FORMAT,
        **header,
        "fingerprint": plan["fingerprint"],
        "num_jobs": len(plan["jobs"]),
        "totals": totals,
        "shards": shards,
        "inputs": input_list,
        "stats": run_stats,
    }


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / MANIFEST
    write_json_atomic(path, manifest)
    return path


def load_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).exists():
        raise UserError(f"{directory}: no such shard directory (written by `python -m pipeline shard`)")
    if not Path(directory).is_dir():
        hint = f": give its directory, {Path(directory).parent}" if Path(directory).name == MANIFEST else ""
        raise UserError(f"{directory} is a file, not a shard directory (the directory that holds {MANIFEST}){hint}")
    if not path.is_file():
        hint = ""
        if (Path(directory) / PARTS_DIR).is_dir():
            hint = " (it holds parts of a multi-task run: run `python -m pipeline merge` first)"
        raise UserError(f"{directory} has no {MANIFEST}{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def part_path(out_dir: Path, task_index: int, num_tasks: int) -> Path:
    return out_dir / PARTS_DIR / f"part-{task_index:05d}-of-{num_tasks:05d}.json"
