"""Run the sharding of one task: plan, check the output directory, run the pending jobs, write the manifest.

With ``num_tasks > 1`` (a SLURM array, or any set of machines sharing the output directory), task ``i`` runs
jobs ``j`` with ``j % num_tasks == i`` and writes ``parts/part-<i>-of-<n>.json``; ``merge`` joins the parts.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.config import save_config, to_dict
from pipeline.errors import UserError
from pipeline.preprocess.config import ShardJobConfig
from pipeline.preprocess.manifest import (
    MANIFEST,
    PARTS_DIR,
    PLAN,
    SUMMED_STATS,
    build_manifest,
    completed_job,
    job_entry,
    part_path,
    write_manifest,
)
from pipeline.preprocess.partners import PartnerIndex
from pipeline.preprocess.plan import Job, input_fingerprint, plan_fingerprint, plan_jobs
from pipeline.preprocess.records import (
    RECORDS_DIR,
    TMP_DIR,
    load_record,
    shards_intact,
    unit_record_path,
    write_json_atomic,
)
from pipeline.preprocess.samples import sample_fields
from pipeline.preprocess.worker import WorkerContext, init_worker, process_job, run_job
from pipeline.progress import progress_bar
from pipeline.text.readers import ReadStats, resolve_inputs
from pipeline.tokenizer.spm import Tokenizer

log = logging.getLogger(__name__)


def _job_from_json(data: dict) -> Job:
    return Job(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _clear_outputs(out: Path) -> None:
    """Remove what a previous sharding run wrote here (and nothing else)."""
    for path in out.glob("*.tar"):
        path.unlink()
    for name in (RECORDS_DIR, TMP_DIR, PARTS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (MANIFEST, PLAN, "report.json"):
        (out / name).unlink(missing_ok=True)


def prepare_output(out: Path, plan: dict, overwrite: bool, task_index: int) -> None:
    """Refuse to mix outputs of different configs; resume outputs of the same one."""
    out.mkdir(parents=True, exist_ok=True)
    existing_plan = load_record(out / PLAN)
    if existing_plan is not None:
        if existing_plan.get("fingerprint") == plan["fingerprint"]:
            return  # same inputs and config: resume
        if not overwrite:
            raise UserError(
                f"{out} holds shards of a different config, tokenizer or input (fingerprint "
                f"{existing_plan.get('fingerprint', '?')[:12]} != {plan['fingerprint'][:12]}); "
                "pass --overwrite to replace them or choose another --output"
            )
        _clear_outputs(out)
    elif any(out.glob("*.tar")) or (out / MANIFEST).exists():
        if not overwrite:
            raise UserError(f"{out} holds shards not written by this tool's planner; pass --overwrite to replace them")
        _clear_outputs(out)
    # Concurrent array tasks write the same plan: a per-task temporary name keeps the rename atomic.
    tmp = out / f"{PLAN}.tmp-{task_index}"
    tmp.write_text(json.dumps(plan) + "\n", encoding="utf-8")
    tmp.replace(out / PLAN)


def _job_done(out: Path, job: Job, verify: bool) -> dict | None:
    record = completed_job(out, job.stem)
    if record is None:
        return None
    for stem in record["units"]:
        unit = load_record(unit_record_path(out, stem))
        if unit is None or not shards_intact(out, unit["shards"], verify):
            return None
    return record


def run_sharding(cfg: ShardJobConfig) -> dict:
    t0, times0 = time.time(), os.times()
    num_tasks, task_index = cfg.run.resolved_tasks()
    tokenizer = Tokenizer(cfg.data.tokenizer)
    files, ignored = resolve_inputs(cfg.input.paths)
    jobs = plan_jobs(files, cfg.input, cfg.data.unit_bytes, cfg.data.min_docs_per_unit)
    content = cfg.content_config()
    inputs = input_fingerprint(files)
    plan = {
        "fingerprint": plan_fingerprint(content, tokenizer.sha256, inputs, cfg.data.objective),
        "files": inputs,
        "ignored": [{"path": p, "reason": r} for p, r in ignored],
        "jobs": [asdict(j) for j in jobs],
    }
    out = Path(cfg.output.dir)
    prepare_output(out, plan, cfg.output.overwrite, task_index)
    save_config(cfg, out / ("config.yaml" if num_tasks == 1 else f"{PARTS_DIR}/config-{task_index:05d}.yaml"))

    mine = [j for j in jobs if j.index % num_tasks == task_index]
    records: dict[int, dict] = {}
    pending: list[Job] = []
    for job in mine:
        done = _job_done(out, job, cfg.run.verify_existing)
        if done is not None:
            records[job.index] = done
        else:
            pending.append(job)
    reused_jobs = len(records)
    if reused_jobs:
        log.info("resuming: %d of %d jobs already complete and verified", reused_jobs, len(mine))

    partners = PartnerIndex(jobs, files, cfg.input)
    if cfg.data.objective == "bert" and cfg.data.random_next_scope == "corpus" and partners.unreachable_bytes:
        share = partners.unreachable_bytes / max(sum(j.size for j in jobs), 1)
        log.warning(
            "random-next partners: %.0f%% of the input (compressed files read as one stream) cannot be reached at "
            "random places and is left out of the draw; decompress them to include it%s",
            100 * share,
            "" if partners.total_bytes else " (nothing is reachable: every unit draws from its own documents)",
        )
    ctx = WorkerContext(cfg=cfg, files=files, tokenizer=tokenizer, out_dir=out, partners=partners)
    workers = min(cfg.run.resolved_workers(), max(1, len(pending)))
    # Largest jobs first so that the last job to finish is a small one (the output order is fixed anyway).
    pending.sort(key=lambda j: (-j.size, j.index))
    total_bytes = sum(j.size for j in pending)
    done_docs = done_tokens = 0
    t_work = time.time()
    with progress_bar(total=total_bytes, desc=f"shard {cfg.data.objective}", unit="B", unit_scale=True) as bar:

        def account(record: dict, size: int) -> None:
            nonlocal done_docs, done_tokens
            records[record["job"]] = record
            done_docs += record["read"]["counts"].get("documents", 0)
            done_tokens += record["tokens"]
            elapsed = max(time.time() - t_work, 1e-9)
            bar.update(size)
            bar.set_postfix(docs_s=f"{done_docs / elapsed:.0f}", tok_s=f"{done_tokens / elapsed:.3g}", refresh=False)

        if workers <= 1:
            init_worker(ctx)
            for job in pending:
                account(process_job(ctx, job), job.size)
        else:
            # fork: the workers inherit the loaded tokenizer and config instead of re-pickling them per job.
            with mp.get_context("fork").Pool(workers, initializer=init_worker, initargs=(ctx,)) as pool:
                sizes = {j.index: j.size for j in pending}
                for record in pool.imap_unordered(run_job, pending, chunksize=1):
                    account(record, sizes[record["job"]])
    if num_tasks == 1:
        shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    # else: concurrent tasks may still be writing their units' temporaries there; `merge` removes it.

    entries = [job_entry(out, records[j.index]) for j in mine]
    header = {
        "objective": cfg.data.objective,
        "seq_len": cfg.data.seq_len,
        "seed": cfg.data.seed,
        "token_dtype": tokenizer.token_dtype.name,
        "sample_fields": sample_fields(cfg.data.objective, cfg.data.static_masking),
        "tokenizer": tokenizer.describe(),
        # Where the shards are (output.dir) and how the work ran (run) do not describe what they hold.
        "config": {k: v for k, v in to_dict(cfg).items() if k != "run"} | {"output": cfg.content_config()["output"]},
    }
    elapsed = time.time() - t0
    times = os.times()
    cpu_seconds = sum(times[k] - times0[k] for k in range(4))  # this process and its (reaped) workers
    part = {"task": task_index, "num_tasks": num_tasks, "fingerprint": plan["fingerprint"], "header": header}
    if num_tasks == 1:
        manifest = build_manifest(plan, entries, header)
        write_manifest(out, manifest)
        totals, stats = manifest["totals"], manifest["stats"]
    else:
        write_json_atomic(part_path(out, task_index, num_tasks), {**part, "entries": entries}, indent=None)
        manifest = None
        totals, stats = _task_summary(entries)
    report = {
        "output": str(out),
        "task": task_index,
        "num_tasks": num_tasks,
        "workers": workers,
        "jobs": len(mine),
        "jobs_reused": reused_jobs,
        "seconds": round(elapsed, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "tokens_per_second": round(totals["tokens"] / max(elapsed, 1e-9), 1),
        "documents_per_second": round(stats.get("documents", 0) / max(elapsed, 1e-9), 1),
        "totals": totals,
        "stats": stats,
        "manifest_written": manifest is not None,
    }
    if cfg.data.objective == "bert":
        report["random_next_scope"] = cfg.data.random_next_scope
        report["single_sentence_documents"] = cfg.data.single_sentence_documents
    if num_tasks == 1:
        write_json_atomic(out / "report.json", report)
    return report


def _task_summary(entries: list[dict]) -> tuple[dict, dict]:
    """Totals and stats of one task's part (the merged manifest has the whole run's)."""
    totals = {"shards": 0, "samples": 0, "tokens": 0, "bytes": 0}
    stats: dict = {"documents": 0, "sentences": 0, "random_next": 0, "single_sentence_documents": 0}
    read = ReadStats()
    for entry in entries:
        read.merge(ReadStats.from_json(entry["read"]))
        for unit in entry["unit_records"]:
            for shard in unit["shards"]:
                totals["shards"] += 1
                for key in ("samples", "tokens", "bytes"):
                    totals[key] += shard[key]
            for key in SUMMED_STATS:
                if key in unit["stats"]:
                    stats[key] = stats.get(key, 0) + unit["stats"][key]
    stats["read"] = read.to_json()
    return totals, stats
