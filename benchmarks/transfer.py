"""What pre-training buys: the same fine-tuning budget from our checkpoint and from random initialisation.

For each task (default: spam and movie-review sentiment, from ../shared/data), two runs of
`python -m pipeline finetune` that differ only in init.weights: "pretrained" (the checkpoint's body and pooler)
and "random" (the same architecture and tokenizer, freshly initialised). Same examples (seeded subsets), same
steps, learning rate, batch, seed; one after the other on the same machine. Scores are the dev-set scores of
the best evaluation (what the kept checkpoint scores), with the final evaluation's beside them.

Prints one JSON line: per task the pretrained and random scores and the gain (pretrained - random) in the
task's metric (accuracy; spam, whose classes are 5:1, also macro F1).

usage: python benchmarks/transfer.py --checkpoint runs/demo-pretrain [--tasks spam,movie-sentiment]
       [--train-examples 2400] [--dev-examples 1000] [--epochs 3] [--lr 5e-4] [--keep DIR] [--table]
       (0 examples: all of them)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def finetune(task: str, weights: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "pipeline", "finetune", "--config", f"configs/finetune/{task}.yaml",
        "--checkpoint", args.checkpoint, "--init.weights", weights, "--train.output_dir", str(out),
        "--data.max_train_examples", str(args.train_examples), "--data.max_dev_examples", str(args.dev_examples),
        "--finetune.epochs", str(args.epochs), "--optim.lr", str(args.lr), "--train.seed", str(args.seed),
        "--tracking.enabled", "false", "--train.loss_curve", "false", *args.extra,
    ]  # fmt: skip
    env = {**os.environ, "PIPELINE_PROGRESS": "0"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    best, final = report["best"], report["final"]
    keys = ("accuracy", "macro_f1")
    return {
        **{k: round(best[k], 4) for k in keys if k in best},
        "best_step": best["step"],
        "final": {k: round(final[k], 4) for k in keys if k in final},
        "steps": report["steps"],
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo-pretrain", help="pre-training checkpoint or export")
    parser.add_argument("--tasks", default="spam,movie-sentiment", help="configs/finetune presets, comma-separated")
    parser.add_argument("--train-examples", type=int, default=2400)
    parser.add_argument("--dev-examples", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--keep", default="", help="keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--table", action="store_true", help="also print a readable table (stderr)")
    parser.add_argument("extra", nargs="*", help="more finetune overrides, after --")
    args = parser.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="transfer-"))
    t0 = time.time()
    sys.path.insert(0, str(REPO))
    from pipeline.export.source import open_pretrained

    source = open_pretrained(args.checkpoint)
    result = {
        "benchmark": "transfer",
        "checkpoint": str(source.path),
        "model": {k: getattr(source.model_cfg, k) for k in ("arch", "hidden_size", "num_layers", "vocab_size")},
        "pretraining": {"step": source.lineage.get("step"), "tokens": source.lineage.get("tokens")},
        "budget": {
            "train_examples": args.train_examples,
            "dev_examples": args.dev_examples,
            "epochs": args.epochs,
            "lr": args.lr,
            "seed": args.seed,
        },
        "tasks": {},
    }
    try:
        for task in [t for t in args.tasks.split(",") if t]:
            runs = {w: finetune(task, w, args, work / f"{task}-{w}") for w in ("pretrained", "random")}
            gain = {k: round(runs["pretrained"][k] - runs["random"][k], 4) for k in ("accuracy", "macro_f1")}
            result["tasks"][task] = {**runs, "gain": gain, "steps": runs["pretrained"]["steps"]}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.time() - t0, 1)
    if args.table:
        print_table(result)
    print(json.dumps(result))


def print_table(result: dict) -> None:
    pre = result["pretraining"]
    lines = [f"fine-tuning from {result['checkpoint']} (pre-trained {pre['step']} steps, {pre['tokens']} tokens) "
             "vs random initialisation, same budget; dev scores of the best evaluation:",
             f"{'task':<18}{'metric':<10}{'pretrained':>12}{'random':>10}{'gain':>9}"]  # fmt: skip
    for task, runs in result["tasks"].items():
        for metric in ("accuracy", "macro_f1"):
            p, r = runs["pretrained"][metric], runs["random"][metric]
            lines.append(f"{task:<18}{metric:<10}{p:>12.4f}{r:>10.4f}{p - r:>+9.4f}")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
