"""What the pre-trained body knows before fine-tuning moves it: a linear probe of its frozen features.

For each task (classification presets of configs/finetune: sentences or pairs) and each start, the body is
loaded as `python -m pipeline finetune` loads it (dropout off, nothing trained), the inputs are encoded as
fine-tuning encodes them, and the mean over the real tokens of the embeddings' output and of every block's
output is one feature vector per example and layer. A logistic regression (features standardised on the
training examples; L2 strength chosen on a fifth of the training examples held out, then refitted on all of
them) is fitted per layer on the training subset and scored on the dev subset: the same seeded subsets as
benchmarks/transfer.py. The same body freshly initialised ("random") is the baseline.

Prints one JSON line: per task, per start, the probe's dev accuracy per layer ("embeddings", "layer_1", ...),
the layer chosen on the held-out fifth, and at that layer the gain over random and the ratio of dev errors
(start / random: below 1 is fewer mistakes). A body whose features are no better than random ones has
learned nothing the task can read linearly; one that is better here but not after fine-tuning
(benchmarks/transfer.py) loses its advantage while fine-tuning (README, "What pre-training buys").

usage: python benchmarks/probe.py --start adapted=runs/transfer-bert-adapt-{task} [--start NAME=DIR ...]
       [--tasks movie-sentiment,spam] [--train-examples 2400] [--dev-examples 1000] [--table]
       [-- --data.train.path FILE ...]   (options of `python -m pipeline finetune`, for every task)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.cli import _CommandParser  # noqa: E402
from pipeline.config import add_config_arguments, build_config, overrides_from_args  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.evaluate.transfer import RANDOM, error, named_starts, preset_path, task_name  # noqa: E402
from pipeline.export.source import open_pretrained  # noqa: E402
from pipeline.finetune.config import FinetuneJobConfig  # noqa: E402
from pipeline.finetune.data import prepare  # noqa: E402
from pipeline.finetune.heads import FinetuneModel, masked_mean  # noqa: E402

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # weight of the squared-weight penalty per example


def parse_starts(items: list[str]) -> dict[str, str]:
    if not items:
        raise SystemExit("give at least one --start NAME=DIR")
    return named_starts(items)


@torch.no_grad()
def layer_features(model: FinetuneModel, problem, features: list, batch_size: int = 128) -> list[torch.Tensor]:
    """Per layer (embeddings, then each block), the (N, H) mean of the states over each example's real tokens."""
    states: list[torch.Tensor] = []  # filled by the hooks, in forward order, for the batch being encoded
    modules = [model.transformer.embeddings, *model.transformer.layers]
    hooks = [m.register_forward_hook(lambda _m, _i, out: states.append(out[0] if isinstance(out, tuple) else out))
             for m in modules]  # fmt: skip
    per_layer: list[list[torch.Tensor]] = [[] for _ in modules]
    try:
        for start in range(0, len(features), batch_size):
            batch = problem.collate(features[start : start + batch_size])
            states.clear()
            model(**{k: v for k, v in batch.items() if k != "labels"})
            for parts, state in zip(per_layer, states, strict=True):
                parts.append(masked_mean(state, batch.get("attention_mask")).float())
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts) for parts in per_layer]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.size(1), num_labels)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (head(x).argmax(-1) == y).float().mean().item()


def probe(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor, num_labels: int,
          seed: int) -> tuple[float, float]:  # fmt: skip
    """(held-out accuracy at the chosen L2, dev accuracy after refitting on all training examples)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, dev_x = (train_x - mean) / std, (dev_x - mean) / std
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    cut = len(order) // 5
    held, fit = order[:cut], order[cut:]
    scores = {l2: accuracy(fit_logistic(train_x[fit], train_y[fit], num_labels, l2), train_x[held], train_y[held])
              for l2 in L2_GRID}  # fmt: skip
    best_l2 = max(L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger penalty
    return scores[best_l2], accuracy(fit_logistic(train_x, train_y, num_labels, best_l2), dev_x, dev_y)


def probe_checkpoint(task: str, checkpoint: str, args: argparse.Namespace, *, with_random: bool) -> dict:
    """The probe of ``checkpoint``'s body ("pretrained") and, with ``with_random``, of the same architecture
    freshly initialised ("random"): the checkpoint is opened and the examples encoded once for both."""
    cfg = build_config(FinetuneJobConfig, preset_path(task), {
        **args.overrides, "init.checkpoint": checkpoint, "data.max_train_examples": args.train_examples,
        "data.max_dev_examples": args.dev_examples, "train.seed": args.seed,
    })  # fmt: skip
    if cfg.task.kind not in ("classification", "pair_classification"):
        raise UserError(f"task {task!r} is {cfg.task.kind}: the probe reads sentence and pair classification only")
    source = open_pretrained(checkpoint)
    model_cfg = replace(source.model_cfg, hidden_dropout=0.0, attention_dropout=0.0)
    prepared = prepare(cfg, source.tokenizer(cfg.tokenizer), model_cfg.arch)
    problem = prepared.problem
    train_y = torch.tensor([f[1] for f in prepared.train_features])
    dev_y = torch.tensor([f[1] for f in prepared.dev_features])
    out = {}
    for weights in ([RANDOM] if with_random else []) + ["pretrained"]:
        torch.manual_seed(args.seed)
        model = FinetuneModel(model_cfg, "classify", problem.num_labels, pooling="mean")
        if weights == "pretrained":
            model.load_pretrained(source.state_dict)
        model.eval()
        train_layers = layer_features(model, problem, prepared.train_features)
        dev_layers = layer_features(model, problem, prepared.dev_features)
        names = ["embeddings", *(f"layer_{i + 1}" for i in range(len(train_layers) - 1))]
        held, dev = {}, {}
        for name, tx, dx in zip(names, train_layers, dev_layers, strict=True):
            held[name], dev[name] = probe(tx, train_y, dx, dev_y, problem.num_labels, args.seed)
        out[weights] = {"dev_accuracy": {k: round(v, 4) for k, v in dev.items()},
                        "heldout_accuracy": {k: round(v, 4) for k, v in held.items()},
                        "train_examples": len(prepared.train_features),
                        "dev_examples": len(prepared.dev_features)}  # fmt: skip
    return out


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """Fine-tuning options after -- (``--data.train.path FILE``...) -> {"data.train.path": "FILE"}, read as
    `python -m pipeline finetune` reads them (its options, aliases and value kinds; anything else an error)."""
    parser = _CommandParser(prog="probe.py ... --", add_help=False)  # the CLI's one-line errors and did-you-mean
    add_config_arguments(parser, FinetuneJobConfig, with_config_file=False)
    return overrides_from_args(parser.parse_args(extra))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", action="append", default=[], metavar="NAME=DIR",
                        help="a pre-trained start (repeatable; {task} in DIR is replaced by the task); "
                        "random is the first start's architecture, freshly initialised")  # fmt: skip
    parser.add_argument("--tasks", default="movie-sentiment,spam", help="configs/finetune presets, comma-separated")
    parser.add_argument("--train-examples", type=int, default=2400)
    parser.add_argument("--dev-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1234, help="the subsets' and the held-out fifth's seed")
    parser.add_argument("--table", action="store_true", help="also print a readable table (stderr)")
    parser.add_argument("extra", nargs="*", help="fine-tuning config overrides, after --")
    args = parser.parse_args()
    starts = parse_starts(args.start)
    args.overrides = parse_overrides(args.extra)
    t0 = time.time()
    result: dict = {"benchmark": "probe", "train_examples": args.train_examples, "dev_examples": args.dev_examples,
                    "seed": args.seed, "tasks": {}}  # fmt: skip
    try:
        for task in (t for t in args.tasks.split(",") if t):
            name = task_name(task)
            runs: dict = {}
            for start, path in starts.items():  # random: the first start's architecture, freshly initialised
                first = RANDOM not in runs
                probed = probe_checkpoint(task, path.replace("{task}", name), args, with_random=first)
                if first:
                    runs[RANDOM] = probed[RANDOM]
                runs[start] = probed["pretrained"]
            base = runs[RANDOM]["dev_accuracy"]
            for start in starts:
                run = runs[start]
                chosen = max(run["heldout_accuracy"], key=run["heldout_accuracy"].get)
                acc, rnd = run["dev_accuracy"][chosen], base[chosen]
                ratio = error(acc, "accuracy") / max(1e-9, error(rnd, "accuracy"))
                run.update(layer=chosen, accuracy=acc, random_accuracy=rnd, gain=round(acc - rnd, 4),
                           error_ratio=round(ratio, 3))  # fmt: skip
            result["tasks"][name] = runs
    except (UserError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))
    if args.table:
        w = max(len(s) for s in starts) + 2
        print(f"{'task':<18}{'start':<{w}}{'layer':<12}{'probe acc':>10}{'random':>9}{'gain':>9}{'error ratio':>13}",
              file=sys.stderr)  # fmt: skip
        for name, runs in result["tasks"].items():
            for start in starts:
                r = runs[start]
                print(f"{name:<18}{start:<{w}}{r['layer']:<12}{r['accuracy']:>10.4f}{r['random_accuracy']:>9.4f}"
                      f"{r['gain']:>+9.4f}{r['error_ratio']:>13.3f}", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
