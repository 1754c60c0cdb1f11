"""Join the parts written by the tasks of a multi-task `shard` run into the final manifest.json.

Every planned job must be covered by a part; the parts must come from the same plan (fingerprint). The merged
manifest is identical to the one a single-task run writes for the same inputs and config.

example:
  python -m pipeline merge shards/
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from pipeline.errors import UserError
from pipeline.preprocess.manifest import PARTS_DIR, PLAN, build_manifest, write_manifest
from pipeline.preprocess.records import TMP_DIR, load_record, shards_intact


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="the shared --output directory of the shard tasks")
    parser.add_argument("--verify", action="store_true", help="re-hash every shard against its record first")


def merge_parts(out: Path, verify: bool = False) -> dict:
    plan = load_record(out / PLAN)
    if plan is None:
        raise UserError(f"{out} has no {PLAN}: it was not written by `python -m pipeline shard`")
    part_files = sorted((out / PARTS_DIR).glob("part-*.json"))
    if not part_files:
        raise UserError(f"{out}/{PARTS_DIR} holds no parts: run the shard tasks first")
    entries: list[dict] = []
    header = None
    seen: dict[int, str] = {}
    for path in part_files:
        part = json.loads(path.read_text(encoding="utf-8"))
        if part["fingerprint"] != plan["fingerprint"]:
            raise UserError(f"{path} belongs to a different plan (other config or inputs); remove it or re-run")
        header = header or part["header"]
        for entry in part["entries"]:
            if entry["job"] in seen and seen[entry["job"]] != path.name:
                raise UserError(f"job {entry['job']} appears in both {seen[entry['job']]} and {path.name}")
            seen[entry["job"]] = path.name
            if verify:
                for unit in entry["unit_records"]:
                    if not shards_intact(out, unit["shards"], True):
                        raise UserError(f"unit {unit['unit']}: a shard is missing or does not match its sha256")
            entries.append(entry)
    manifest = build_manifest(plan, entries, header)
    write_manifest(out, manifest)
    shutil.rmtree(out / TMP_DIR, ignore_errors=True)  # every task is done: their temporaries are debris
    return manifest


def run(args: argparse.Namespace) -> int:
    manifest = merge_parts(Path(args.directory), verify=args.verify)
    totals = manifest["totals"]
    print(
        f"merged {manifest['num_jobs']} jobs: {totals['shards']} shards, {totals['samples']} samples, "
        f"{totals['tokens']} tokens -> {Path(args.directory) / 'manifest.json'}"
    )
    return 0
