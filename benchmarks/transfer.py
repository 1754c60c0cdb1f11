"""What pre-training buys: the same fine-tuning budget from our checkpoints and from random initialisation.

For each task (default: spam and movie-review sentiment, from ../shared/data) and each seed, runs of
`python -m pipeline finetune` that differ only in where the weights come from: each pre-trained start
(--checkpoint, or one or more --start NAME=DIR, where DIR may hold {task} for a per-task checkpoint such as a
task-adapted one) and "random" (the first start's architecture and tokenizer, freshly initialised). Same
examples (seeded subsets), steps, learning rate and batch; the seed (train.seed) changes the head's
initialisation, dropout and batch order of every run alike. One run after the other on the same machine.
Scores are the dev-set scores of the best evaluation (what the kept checkpoint scores).

Prints one JSON line: per task, per start, the per-seed scores and their mean, and the gain over random
(pretrained - random, per seed and mean) in accuracy and macro F1 (spam's classes are 5:1), the ratio of the
dev errors (pretrained / random: below 1 is fewer mistakes) and "wins", the seeds in which the start beat
random in both metrics.

usage: python benchmarks/transfer.py --checkpoint runs/demo-pretrain [--tasks spam,movie-sentiment]
       [--start NAME=DIR ...] [--seeds 1234,1,2] [--train-examples 2400] [--dev-examples 1000]
       [--epochs 3] [--lr 5e-4] [--keep DIR] [--table] [-- finetune overrides]   (0 examples: all of them)
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


METRICS = ("accuracy", "macro_f1")


def finetune(task: str, checkpoint: str, weights: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "pipeline", "finetune", "--config", f"configs/finetune/{task}.yaml",
        "--checkpoint", checkpoint, "--init.weights", weights, "--train.output_dir", str(out),
        "--data.max_train_examples", str(args.train_examples), "--data.max_dev_examples", str(args.dev_examples),
        "--finetune.epochs", str(args.epochs), "--optim.lr", str(args.lr), "--train.seed", str(seed),
        "--tracking.enabled", "false", "--train.loss_curve", "false", *args.extra,
    ]  # fmt: skip
    env = {**os.environ, "PIPELINE_PROGRESS": "0"}
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: never resume a kept one from an earlier call
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    best, final = report["best"], report["final"]
    return {
        "seed": seed,
        **{k: round(best[k], 4) for k in METRICS if k in best},
        "best_step": best["step"],
        "final": {k: round(final[k], 4) for k in METRICS if k in final},
        "steps": report["steps"],
        "seconds": round(time.time() - t0, 1),
    }


def describe(source) -> dict:
    return {
        "checkpoint": str(source.path),
        "model": {k: getattr(source.model_cfg, k) for k in ("arch", "hidden_size", "num_layers", "vocab_size")},
        "pretraining": {"step": source.lineage.get("step"), "tokens": source.lineage.get("tokens")},
    }


def parse_starts(args: argparse.Namespace) -> dict[str, str]:
    if not args.start:
        return {"pretrained": args.checkpoint}
    starts: dict[str, str] = {}
    for item in args.start:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name == "random" or name in starts:
            raise SystemExit(f"--start {item!r}: expected NAME=DIR, NAME unique and not 'random'")
        starts[name] = path
    return starts


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Means over the seeds, and each pre-trained start's gain over random, seed by seed."""
    mean = {name: {k: round(sum(r[k] for r in rs) / len(rs), 4) for k in METRICS} for name, rs in runs.items()}
    out: dict = {"mean": mean, "gain": {}, "error_ratio": {}, "gain_per_seed": {}, "wins": {}}
    for name, rs in runs.items():
        if name == "random":
            continue
        per_seed = [{k: round(r[k] - b[k], 4) for k in METRICS} for r, b in zip(rs, runs["random"], strict=True)]
        out["gain_per_seed"][name] = per_seed
        out["gain"][name] = {k: round(mean[name][k] - mean["random"][k], 4) for k in METRICS}
        # the ratio to the baseline: the start's dev error as a fraction of random initialisation's
        out["error_ratio"][name] = round((1 - mean[name]["accuracy"]) / max(1e-9, 1 - mean["random"]["accuracy"]), 4)
        out["wins"][name] = sum(all(g[k] > 0 for k in METRICS) for g in per_seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo-pretrain", help="pre-training checkpoint or export")
    parser.add_argument(
        "--start", action="append", default=[], metavar="NAME=DIR",
        help="a pre-trained start to compare (repeatable; {task} in DIR is replaced by the task); "
        "default: pretrained=--checkpoint",
    )  # fmt: skip
    parser.add_argument("--tasks", default="spam,movie-sentiment", help="configs/finetune presets, comma-separated")
    parser.add_argument("--seeds", default="1234", help="training seeds, comma-separated (one set of runs each)")
    parser.add_argument("--train-examples", type=int, default=2400)
    parser.add_argument("--dev-examples", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--keep", default="", help="keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--table", action="store_true", help="also print a readable table (stderr)")
    parser.add_argument("extra", nargs="*", help="more finetune overrides, after --")
    args = parser.parse_args()
    starts = parse_starts(args)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    tasks = [t for t in args.tasks.split(",") if t]

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="transfer-"))
    t0 = time.time()
    sys.path.insert(0, str(REPO))
    from pipeline.export.source import open_pretrained

    sources = {(name, task): open_pretrained(path.format(task=task)) for name, path in starts.items() for task in tasks}
    result = {
        "benchmark": "transfer",
        "starts": {name: {t: describe(src) for (n, t), src in sources.items() if n == name} for name in starts},
        "budget": {
            "train_examples": args.train_examples,
            "dev_examples": args.dev_examples,
            "epochs": args.epochs,
            "lr": args.lr,
            "seeds": seeds,
            "overrides": args.extra,
        },
        "tasks": {},
    }
    first = next(iter(starts))
    try:
        for task in tasks:
            runs: dict[str, list[dict]] = {name: [] for name in [*starts, "random"]}
            for seed in seeds:
                for name in starts:
                    path = str(sources[name, task].path)
                    runs[name].append(finetune(task, path, "pretrained", seed, args, work / f"{task}-{name}-{seed}"))
                baseline = str(sources[first, task].path)
                runs["random"].append(finetune(task, baseline, "random", seed, args, work / f"{task}-random-{seed}"))
            result["tasks"][task] = {"runs": runs, **summarise(runs), "steps": runs["random"][0]["steps"]}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.time() - t0, 1)
    if args.table:
        print_table(result)
    print(json.dumps(result))


def print_table(result: dict) -> None:
    seeds = result["budget"]["seeds"]
    lines = [f"fine-tuning from pre-trained checkpoints vs random initialisation, same budget; dev scores of the "
             f"best evaluation, mean over {len(seeds)} seed(s) {seeds}:"]  # fmt: skip
    for name, per_task in result["starts"].items():
        for task, info in per_task.items():
            pre = info["pretraining"]
            lines.append(f"  {name} ({task}): {info['checkpoint']}, {pre['step']} steps, {pre['tokens']} tokens")
    names = [n for n in result["starts"]]
    header = f"{'task':<18}{'metric':<10}" + "".join(f"{n:>12}" for n in [*names, "random"])
    header += "".join(f"{'gain ' + n:>16}{'wins':>6}" for n in names)
    lines.append(header)
    for task, t in result["tasks"].items():
        for metric in METRICS:
            row = f"{task:<18}{metric:<10}" + "".join(f"{t['mean'][n][metric]:>12.4f}" for n in [*names, "random"])
            row += "".join(f"{t['gain'][n][metric]:>+16.4f}{t['wins'][n]:>3}/{len(seeds)}" for n in names)
            lines.append(row)
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
