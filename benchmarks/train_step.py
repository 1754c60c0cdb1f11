"""End-to-end training throughput against the bare model step: what the loader and DeepSpeed cost.

Prints one JSON line. Measured side by side in one run, same model config, batch, sequence length, optimizer:

- bare: the model's forward + backward + AdamW step on one fixed, pre-built batch in a plain loop (what
  benchmarks/model_step.py measures), no data loading, no DeepSpeed;
- end_to_end: ``python -m pipeline train`` on real shards (the streaming loader with dynamic masking,
  DeepSpeed ZeRO, gradient clipping, metrics, MLflow), samples/s over the steps after a warm-up window.

ratio = end_to_end / bare (goal >= 0.9). The bare step is timed before and after the training run and the
mean is used, so that drift of the machine hits both alike.

usage: python benchmarks/train_step.py [--preset bert-mini] [--batch 32] [--steps 40] [--zero 1]
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

import torch  # noqa: E402

from pipeline.model import build_model, load_model_preset  # noqa: E402
from pipeline.train.engine import param_groups  # noqa: E402

CORPUS = REPO / "data_shards" / "demo_corpus" / "sotu_1900-2021.jsonl.gz"


def cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, check=True, capture_output=True, text=True
    )


def bare_step_rate(preset: str, vocab: int, batch: int, seq_len: int, steps: int, lr: float) -> float:
    """Samples/s of forward + backward + AdamW on one fixed batch (median of 3 rounds)."""
    torch.manual_seed(0)
    cfg = load_model_preset(preset, {"vocab_size": vocab})
    model = build_model(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=lr)
    ids = torch.randint(9, vocab, (batch, seq_len))
    labels = torch.full_like(ids, -100)
    mask = torch.rand(batch, seq_len) < 0.15
    labels[mask] = ids[mask]
    types = torch.zeros_like(ids)
    types[:, seq_len // 2 :] = 1
    attn = None  # unpadded: no mask, as the trainer passes it
    nsp = torch.randint(0, 2, (batch,))

    def step():
        out = model(ids, token_type_ids=types, attention_mask=attn, mlm_labels=labels, nsp_labels=nsp)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    rounds = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        rounds.append(steps * batch / (time.perf_counter() - t))
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-mini")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed training steps (after 10 warm-up steps)")
    parser.add_argument("--bare-steps", type=int, default=8, help="steps per timing round of the bare step")
    parser.add_argument("--zero", type=int, default=1, help="ZeRO stage of the end-to-end run")
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the end-to-end run")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        cli("tokenizer", "--input", str(CORPUS), "--vocab-size", "8000", "--output", str(work / "tok"))
        cli("shard", "--input", str(CORPUS), "--tokenizer", str(work / "tok"), "--output", str(work / "shards"),
            "--objective", "bert", "--seq-len", str(args.seq_len), "--workers", "2")  # fmt: skip
        vocab = json.loads((work / "tok" / "tokenizer_meta.json").read_text())["vocab_size"]
        lr = 1e-4
        before = bare_step_rate(args.preset, vocab, args.batch, args.seq_len, args.bare_steps, lr)
        warmup = 10
        run = work / "run"
        config = work / "bench.yaml"  # the debug job with the benchmarked model size
        config.write_text(
            f"include: [{REPO / 'configs/pretrain/debug.yaml'}, {REPO / 'configs/model' / (args.preset + '.yaml')}]\n"
        )
        cli(
            "train", "--config", str(config), "--data.shards", str(work / "shards"), "--train.output_dir", str(run),
            "--train.micro_batch_size", str(args.batch), "--train.global_batch_size", str(args.batch),
            "--train.max_steps", str(warmup + args.steps), "--train.log_every", str(warmup),
            "--train.zero_stage", str(args.zero), "--deepspeed.config", f"configs/deepspeed/zero{args.zero}.json",
            "--optim.name", "adamw", "--optim.lr", str(lr), "--data.num_workers", str(args.workers),
            "--data.pad_to", "seq_len", "--checkpoint.every_steps", "0", "--checkpoint.every_minutes", "0",
            "--train.loss_curve", "false",
        )  # fmt: skip
        after = bare_step_rate(args.preset, vocab, args.batch, args.seq_len, args.bare_steps, lr)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        windows = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]  # the first includes warm-up
        e2e = statistics.mean(windows)
        bare = (before + after) / 2
        print(json.dumps({
            "benchmark": "train_step", "preset": args.preset, "vocab_size": vocab, "seq_len": args.seq_len,
            "batch": args.batch, "zero_stage": args.zero, "loader_workers": args.workers, "device": "cpu",
            "bare_samples_per_s": round(bare, 2), "bare_rounds": [round(before, 2), round(after, 2)],
            "end_to_end_samples_per_s": round(e2e, 2), "end_to_end_windows": [round(w, 2) for w in windows],
            "ratio": round(e2e / bare, 3), "goal": 0.9,
        }))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
