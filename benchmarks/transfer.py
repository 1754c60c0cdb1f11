"""What pre-training buys: the same fine-tuning budget from our checkpoints and from random initialisation.

For each task (default: spam and movie-review sentiment, from ../shared/data; any configs/finetune preset or
fine-tuning YAML works: classification, pair classification, multiple choice, SQuAD) and each seed, runs of
`python -m pipeline finetune` that differ only in where the weights come from: each pre-trained start
(--checkpoint, or one or more --start NAME=DIR, where DIR may hold {task} for a per-task checkpoint such as a
task-adapted one) and "random" (the first start's architecture and tokenizer, freshly initialised). Same
examples (seeded subsets), steps, learning rate and batch; the seed (train.seed) changes the head's
initialisation, dropout and batch order of every run alike, and with --subset-per-seed also which training
examples are drawn (data.subset_seed; the dev set stays the one a task-adapted pre-training held out). One
run after the other on the same machine. Scores are the dev-set scores of the best evaluation (what the kept
checkpoint scores).

Prints one JSON line: per task, per start, the per-seed scores and their mean, and the gain over random
(pretrained - random, per seed and mean) in the metrics the task reports (accuracy and macro F1 for
classification, accuracy for multiple choice, exact match and F1 for SQuAD; "metrics" lists them), the ratio
of the dev errors on the task's selection metric (pretrained / random: below 1 is fewer mistakes) and "wins",
the seeds in which the start beat random in every compared metric. The logic lives in
pipeline/evaluate/transfer.py, which `python -m pipeline evaluate` shares.

usage: python benchmarks/transfer.py --checkpoint runs/demo-pretrain [--tasks spam,movie-sentiment]
       [--start NAME=DIR ...] [--seeds 1234,1,2] [--train-examples 2400] [--dev-examples 1000]
       [--epochs 3] [--lr 5e-4] [--subset-per-seed] [--keep DIR] [--table] [-- finetune overrides]
       (0 examples: all of them)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.errors import UserError  # noqa: E402
from pipeline.evaluate.transfer import RANDOM, Budget, compare, format_table, named_starts, summarise  # noqa: E402, F401


def parse_starts(args: argparse.Namespace) -> dict[str, str]:
    return named_starts(args.start) if args.start else {"pretrained": args.checkpoint}


def print_table(result: dict) -> None:
    print(format_table(result), file=sys.stderr)


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
    parser.add_argument(
        "--subset-per-seed", action="store_true",
        help="each seed also draws its own training subset (data.subset_seed; the dev set stays)",
    )  # fmt: skip
    parser.add_argument("--keep", default="", help="keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--table", action="store_true", help="also print a readable table (stderr)")
    parser.add_argument("--progress", action="store_true", help="a line per finished run (stderr)")
    parser.add_argument("extra", nargs="*", help="more finetune overrides, after --")
    args = parser.parse_args()
    starts = parse_starts(args)
    budget = Budget(train_examples=args.train_examples, dev_examples=args.dev_examples, epochs=args.epochs,
                    lr=args.lr, seeds=[int(x) for x in args.seeds.split(",") if x], overrides=args.extra,
                    subset_per_seed=args.subset_per_seed)  # fmt: skip
    tasks = [t for t in args.tasks.split(",") if t]

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="transfer-"))
    progress = (lambda line: print(line, file=sys.stderr, flush=True)) if args.progress else None
    try:
        result = compare(starts, tasks, budget, work, baseline=True, progress=progress)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None  # the runs stay in `work` for a look at their logs
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if args.table:
        print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
