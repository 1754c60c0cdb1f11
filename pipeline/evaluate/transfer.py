"""What pre-training buys: fine-tuning runs that differ only in where the weights come from, and their scores.

For each task (a ``configs/finetune`` preset) and each seed, ``python -m pipeline finetune`` runs once per
pre-trained start and, when asked, once from random initialisation of the first start's architecture and
tokenizer ("random"). Same examples (seeded subsets), steps, learning rate and batch; the seed (train.seed)
changes the head's initialisation, dropout and batch order of every run alike. Each run is a fresh process
(no state leaks from one run to the next) and scores are the dev-set scores of its best evaluation (what the
kept checkpoint scores).

The metrics compared are the ones a task reports: accuracy and macro F1 for (pair) classification, accuracy
for multiple choice, exact match and F1 (in percent) for SQuAD. Against random: the gain per seed and its
mean, the ratio of dev errors on the task's selection metric (below 1: fewer mistakes) and the seeds won
(better in every compared metric). Used by ``python -m pipeline evaluate`` and ``benchmarks/transfer.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "configs" / "finetune"
RANDOM = "random"
# Scores a fine-tuning report can hold, in the order tables show them; a task is compared on those it has.
METRICS = ("accuracy", "macro_f1", "exact_match", "f1", "best_exact", "best_f1")
PERCENT = {"exact_match", "f1", "best_exact", "best_f1"}  # SQuAD's official scripts report percentages


@dataclass
class Budget:
    """What every run of a comparison gets (0 examples: all of them; None: the preset's own value)."""

    train_examples: int = 2400
    dev_examples: int = 1000
    epochs: float | None = 3
    lr: float | None = 5e-4
    seeds: list[int] = field(default_factory=lambda: [1234])
    overrides: list[str] = field(default_factory=list)  # more `finetune` arguments, for every run
    task_overrides: dict[str, list[str]] = field(default_factory=dict)  # and for one task's runs
    subset_per_seed: bool = False  # each seed draws its own training subset (data.subset_seed = the seed)

    def as_dict(self) -> dict:
        out = {"train_examples": self.train_examples, "dev_examples": self.dev_examples, "epochs": self.epochs,
               "lr": self.lr, "seeds": self.seeds, "overrides": self.overrides}  # fmt: skip
        if self.subset_per_seed:
            out["subset_per_seed"] = True
        if self.task_overrides:
            out["task_overrides"] = self.task_overrides
        return out


def named_starts(items: list[str]) -> dict[str, str]:
    """``NAME=DIR`` arguments (``--start``) -> {name: dir}, in order; names unique and never ``random``."""
    starts: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name == RANDOM or name in starts:
            raise SystemExit(f"--start {item!r}: expected NAME=DIR, NAME unique and not 'random'")
        starts[name] = path
    return starts


def preset_path(task: str) -> Path:
    """A task is a preset name (``configs/finetune/<task>.yaml``) or a path to a fine-tuning YAML."""
    path = Path(task) if task.endswith((".yaml", ".yml")) else PRESETS / f"{task}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise UserError(f"task {task!r}: no fine-tuning preset {path} (known presets: {known})")
    return path.resolve()


def task_name(task: str) -> str:
    return Path(task).stem if task.endswith((".yaml", ".yml")) else task


def finetune_run(task: str, checkpoint: str, weights: str, seed: int, budget: Budget, out: Path) -> dict:
    """One `python -m pipeline finetune` process; its best and final dev scores."""
    cmd = [sys.executable, "-m", "pipeline", "finetune", "--config", str(preset_path(task)),
           "--checkpoint", checkpoint, "--init.weights", weights, "--train.output_dir", str(out.resolve()),
           "--data.max_train_examples", str(budget.train_examples),
           "--data.max_dev_examples", str(budget.dev_examples), "--train.seed", str(seed),
           "--tracking.enabled", "false", "--train.loss_curve", "false"]  # fmt: skip
    if budget.epochs is not None:
        cmd += ["--finetune.epochs", str(budget.epochs)]
    if budget.lr is not None:
        cmd += ["--optim.lr", str(budget.lr)]
    if budget.subset_per_seed:
        cmd += ["--data.subset_seed", str(seed)]
    cmd += [*budget.overrides, *budget.task_overrides.get(task_name(task), [])]
    env = {**os.environ, "PIPELINE_PROGRESS": "0"}
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: never resume a kept one from an earlier call
    t0 = time.time()
    # From the repository, where the presets' relative data paths (../shared/data) point.
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.log").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}", encoding="utf-8")
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"fine-tuning {task_name(task)} from {weights} weights (seed {seed}) failed: {last} "
                        f"(its log: {out / 'finetune.log'})")  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    best, final = report["best"], report["final"]
    return {
        "seed": seed,
        **{k: round(best[k], 4) for k in METRICS if k in best},
        "metric": best.get("metric"),
        "best_step": best["step"],
        "final": {k: round(final[k], 4) for k in METRICS if k in final},
        "steps": report["steps"],
        "train_examples": report.get("train_examples"),
        "task_kind": report.get("task"),
        "seconds": round(time.time() - t0, 1),
    }


def compared_metrics(runs: dict[str, list[dict]]) -> list[str]:
    """The metrics every run of a task reports (classification: accuracy and macro F1; multiple choice:
    accuracy; SQuAD: exact match and F1)."""
    every = [r for rs in runs.values() for r in rs]
    return [k for k in METRICS if every and all(k in r for r in every)]


def error(value: float, metric: str) -> float:
    return (100.0 if metric in PERCENT else 1.0) - value


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Means over the seeds and, when "random" ran, each pre-trained start's gain over it, seed by seed."""
    metrics = compared_metrics(runs)
    first = next((r for rs in runs.values() for r in rs), {})
    primary = first.get("metric") if first.get("metric") in metrics else (metrics[0] if metrics else None)
    mean = {name: {k: round(sum(r[k] for r in rs) / len(rs), 4) for k in metrics} for name, rs in runs.items()}
    out: dict = {"metrics": metrics, "metric": primary, "mean": mean, "gain": {}, "error_ratio": {},
                 "gain_per_seed": {}, "wins": {}}  # fmt: skip
    if RANDOM not in runs:
        return out
    for name, rs in runs.items():
        if name == RANDOM:
            continue
        per_seed = [{k: round(r[k] - b[k], 4) for k in metrics} for r, b in zip(rs, runs[RANDOM], strict=True)]
        out["gain_per_seed"][name] = per_seed
        out["gain"][name] = {k: round(mean[name][k] - mean[RANDOM][k], 4) for k in metrics}
        if primary:  # the start's dev error as a fraction of random initialisation's, on the selection metric
            ratio = error(mean[name][primary], primary) / max(1e-9, error(mean[RANDOM][primary], primary))
            out["error_ratio"][name] = round(ratio, 4)
        out["wins"][name] = sum(all(g[k] > 0 for k in metrics) for g in per_seed)
    return out


def compare(
    starts: dict[str, str],
    tasks: list[str],
    budget: Budget,
    work: Path,
    baseline: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Fine-tune every task from every start (``{task}`` in a start's path: a per-task checkpoint) and, with
    ``baseline``, from random initialisation of the first start; returns the result that
    ``benchmarks/transfer.py`` prints and ``evaluate`` tabulates."""
    from pipeline.export.source import open_pretrained

    for task in tasks:
        preset_path(task)  # every task exists before the first run starts
    sources = {(name, task): open_pretrained(path.format(task=task_name(task)))
               for name, path in starts.items() for task in tasks}  # fmt: skip
    described = {name: {task_name(t): describe(s) for (n, t), s in sources.items() if n == name} for name in starts}
    result: dict = {
        "benchmark": "transfer",
        "starts": described,
        "budget": budget.as_dict(),
        "tasks": {},
    }
    names = [*starts, RANDOM] if baseline else list(starts)
    total, done = len(tasks) * len(budget.seeds) * len(names), 0
    first = next(iter(starts))
    t0 = time.time()
    for task in tasks:
        name_of_task = task_name(task)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for seed in budget.seeds:
            for name in names:
                source = sources[first if name == RANDOM else name, task]
                weights = RANDOM if name == RANDOM else "pretrained"
                out = work / f"{name_of_task}-{name}-{seed}"
                run = finetune_run(task, str(source.path.resolve()), weights, seed, budget, out)
                runs[name].append(run)
                done += 1
                if progress:
                    scores = ", ".join(f"{k} {run[k]:.4f}" for k in METRICS if k in run)
                    progress(f"[{done}/{total}] {name_of_task} from {name}, seed {seed}: {scores} "
                             f"({run['steps']} steps, {run['seconds']:.0f} s)")  # fmt: skip
        result["tasks"][name_of_task] = {"runs": runs, **summarise(runs), "kind": runs[names[0]][0]["task_kind"],
                                         "steps": runs[names[0]][0]["steps"]}  # fmt: skip
    result["seconds"] = round(time.time() - t0, 1)
    return result


def describe(source) -> dict:
    return {
        "checkpoint": str(source.path),
        "model": {k: getattr(source.model_cfg, k) for k in ("arch", "hidden_size", "num_layers", "vocab_size")},
        "pretraining": {"step": source.lineage.get("step"), "tokens": source.lineage.get("tokens")},
    }


def _starts_and_random(result: dict) -> tuple[list[str], bool]:
    names = list(result["starts"])
    any_task = next(iter(result["tasks"].values()), {})
    return names, RANDOM in any_task.get("mean", {})


def format_table(result: dict) -> str:
    """A fixed-width table: one row per task and metric, each start's mean, random's, the gains and wins."""
    seeds = result["budget"]["seeds"]
    names, with_random = _starts_and_random(result)
    lines = [f"fine-tuning from pre-trained checkpoints{' vs random initialisation' if with_random else ''}, same "
             f"budget; dev scores of the best evaluation, mean over {len(seeds)} seed(s) {seeds}:"]  # fmt: skip
    for name, per_task in result["starts"].items():
        for task, info in per_task.items():
            pre = info["pretraining"]
            lines.append(f"  {name} ({task}): {info['checkpoint']}, {pre['step']} steps, {pre['tokens']} tokens")
    columns = [*names, RANDOM] if with_random else names
    # Columns as wide as their names (a start may be called "bert-adapted"), at least 12; two spaces between.
    width = {n: max(12, len(n) + 2) for n in columns}
    gain_width = {n: max(16, len(n) + 7) for n in names}
    header = f"{'task':<18}{'metric':<12}" + "".join(f"{n:>{width[n]}}" for n in columns)
    if with_random:
        header += "".join(f"{'gain ' + n:>{gain_width[n]}}{'wins':>6}" for n in names)
    lines.append(header)
    for task, t in result["tasks"].items():
        for metric in t.get("metrics", [k for k in METRICS if k in t["mean"][names[0]]]):
            row = f"{task:<18}{metric:<12}" + "".join(f"{t['mean'][n][metric]:>{width[n]}.4f}" for n in columns)
            if with_random:
                row += "".join(
                    f"{t['gain'][n][metric]:>+{gain_width[n]}.4f}{t['wins'][n]:>3}/{len(seeds)}" for n in names
                )
            lines.append(row)
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The same table in Markdown: one row per task, the task's metrics as "name value" pairs per column."""
    names, with_random = _starts_and_random(result)
    columns = [*names, RANDOM] if with_random else names
    head = ["task", "metric", *columns]
    if with_random:
        head += [f"gain {n}" for n in names] + ["error ratio", "seeds won"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seeds = len(result["budget"]["seeds"])
    for task, t in result["tasks"].items():
        metrics = t.get("metrics", [])
        row = [task, " / ".join(metrics)]
        row += [" / ".join(f"{t['mean'][n][k]:.4f}" for k in metrics) for n in columns]
        if with_random:
            row += [" / ".join(f"{t['gain'][n][k]:+.4f}" for k in metrics) for n in names]
            row += [", ".join(f"{t['error_ratio'].get(n, float('nan')):.3f}" for n in names),
                    ", ".join(f"{t['wins'][n]}/{seeds}" for n in names)]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Bars per task: each start's (and random's) mean of the task's selection metric, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, with_random = _starts_and_random(result)
    columns = [*names, RANDOM] if with_random else names
    tasks = list(result["tasks"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(tasks) * max(1, len(columns)) / 2, 3.6))
    width = 0.8 / len(columns)
    for j, name in enumerate(columns):
        xs, heights = [], []
        for i, task in enumerate(tasks):
            t = result["tasks"][task]
            metric = t["metric"]
            scale = 0.01 if metric in PERCENT else 1.0  # SQuAD's percentages on the same 0-1 axis
            x = i - 0.4 + width * (j + 0.5)
            xs.append(x)
            heights.append(t["mean"][name][metric] * scale)
            ax.scatter([x] * len(t["runs"][name]), [r[metric] * scale for r in t["runs"][name]], s=8, color="black",
                       zorder=3)  # fmt: skip
        ax.bar(xs, heights, width * 0.95, label=name, color="0.7" if name == RANDOM else None)
    ax.set_xticks(range(len(tasks)), [f"{t}\n({result['tasks'][t]['metric']})" for t in tasks], fontsize=8)
    ax.set_ylabel("dev score (best evaluation)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("fine-tuning from the checkpoint" + (" vs random initialisation" if with_random else ""),
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
