"""Samples per second delivered by one rank's pre-training loader, against a plain webdataset pipeline.

Prints one JSON line. Measured side by side in one run, alternating rounds on the same shards:

- ours: ``PretrainLoader`` (BERT, seq 128, dynamic masking, pad to seq_len, collated (B, T) int64 batches),
  rank 0 of 1, ``--workers`` DataLoader workers; every round is whole epochs, worker start-up included;
- baseline: ``wds.WebDataset(urls).shuffle(1000).decode()`` with a map that pads the ids to seq_len, batched by
  a DataLoader with the same workers and its default collate. It does less work (no masking, no token
  types, no attention mask, no position bookkeeping).

samples_per_s is the median over rounds; ratio = samples_per_s / goal (goal: 7,500 samples/s per rank), and
ratio_to_baseline = samples_per_s / baseline_samples_per_s. main_cpu_us_per_batch is the training process's
own CPU time per batch received (what the loader costs the process that also drives the GPU).

usage: python benchmarks/loader.py [--shards DIR] [--batch 64] [--workers 2] [--rounds 3] [--seconds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PIPELINE_PROGRESS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pipeline.data import DataConfig, PretrainLoader  # noqa: E402
from pipeline.preprocess.manifest import load_manifest  # noqa: E402

GOAL = 7500.0
DEMO_CORPUS = REPO / "data_shards" / "demo_corpus" / "sotu_1900-2021.jsonl.gz"


def build_shards(work: Path, dupe_factor: int) -> Path:
    tok, out = work / "tok", work / "bert128"
    run = [sys.executable, "-m", "pipeline"]
    subprocess.run([*run, "tokenizer", "--input", str(DEMO_CORPUS), "--vocab-size", "8000", "--output", str(tok)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*run, "shard", "--input", str(DEMO_CORPUS), "--tokenizer", str(tok), "--output", str(out),
                    "--objective", "bert", "--seq-len", "128", "--data.dupe_factor", str(dupe_factor),
                    "--workers", "2"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return out


def timed(seconds: float, epoch_iter) -> dict:
    """Whole epochs until ``seconds`` have passed: samples, wall time, this process's CPU time, batches."""
    samples = count = 0
    wall, cpu = time.perf_counter(), time.process_time()
    epoch = 0
    while True:
        for batch in epoch_iter(epoch):
            samples += batch["input_ids"].shape[0]
            count += 1
        epoch += 1
        if time.perf_counter() - wall >= seconds:
            break
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"samples": samples, "seconds": wall, "rate": samples / wall, "main_cpu_us_per_batch": 1e6 * cpu / count}


def ours(shards: Path, batch: int, workers: int, seconds: float) -> dict:
    loader = PretrainLoader(
        DataConfig(shards=str(shards), num_workers=workers), micro_batch_size=batch, rank=0, world_size=1, seed=1
    )
    return timed(seconds, loader.iterate)


def _pad(seq_len: int):
    def pad(sample: dict) -> dict:
        arr = sample["bert.npy"]
        ids = np.zeros(seq_len, dtype=np.int64)
        ids[: len(arr) - 1] = arr[1:]
        return {"input_ids": ids, "nsp_labels": int(arr[0])}

    return pad


def baseline(shards: Path, batch: int, workers: int, seconds: float) -> dict:
    urls = [str(shards / s["name"]) for s in load_manifest(shards)["shards"]]
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=None, workersplitter=wds.split_by_worker)
        .shuffle(1000)
        .decode()
        .map(_pad(128))
    )

    def epoch_iter(epoch: int):
        return DataLoader(dataset, batch_size=batch, num_workers=workers, prefetch_factor=4 if workers else None)

    return timed(seconds, epoch_iter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shards", type=Path, help="BERT seq-128 shard directory (default: built from the demo corpus)"
    )
    parser.add_argument("--batch", type=int, default=64, help="micro-batch size")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each pipeline")
    parser.add_argument("--seconds", type=float, default=6.0, help="minimum seconds per round (whole epochs)")
    parser.add_argument("--dupe-factor", type=int, default=3, help="for the shards built from the demo corpus")
    args = parser.parse_args()
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        shards = args.shards or build_shards(work, args.dupe_factor)
        manifest = load_manifest(shards)
        assert manifest["objective"] == "bert" and manifest["seq_len"] == 128, "needs BERT seq-128 shards"
        rounds = {"ours": [], "baseline": []}
        for _ in range(args.rounds):
            rounds["ours"].append(ours(shards, args.batch, args.workers, args.seconds))
            rounds["baseline"].append(baseline(shards, args.batch, args.workers, args.seconds))
        rate = statistics.median(r["rate"] for r in rounds["ours"])
        base = statistics.median(r["rate"] for r in rounds["baseline"])
        print(
            json.dumps(
                {
                    "benchmark": "loader",
                    "cpus": os.cpu_count(),
                    "shard_samples": manifest["totals"]["samples"],
                    "micro_batch_size": args.batch,
                    "num_workers": args.workers,
                    "samples_per_s": round(rate),
                    "goal_samples_per_s": GOAL,
                    "ratio": round(rate / GOAL, 3),
                    "baseline": "wds.WebDataset.shuffle(1000).decode() + pad map + default collate, no masking",
                    "baseline_samples_per_s": round(base),
                    "ratio_to_baseline": round(rate / base, 3),
                    "main_cpu_us_per_batch": round(
                        statistics.median(r["main_cpu_us_per_batch"] for r in rounds["ours"])
                    ),
                    "baseline_main_cpu_us_per_batch": round(
                        statistics.median(r["main_cpu_us_per_batch"] for r in rounds["baseline"])
                    ),
                    "rounds_samples_per_s": {k: [round(r["rate"]) for r in v] for k, v in rounds.items()},
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
