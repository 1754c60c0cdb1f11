"""One table from several `benchmarks/transfer.py` JSON lines: each start beside its own random baseline.

`transfer.py` compares the starts of one architecture against random initialisation of that architecture;
BERT and GPT starts therefore come from separate runs. This reads their JSON lines (files, or `-` for stdin)
and prints, per task and metric, every start with its random baseline, the gain, the ratio of dev errors
(start / random: below 1 is fewer mistakes) and the seeds won, as Markdown (the README's table) and, with
--json, as one JSON line; "gain sd" is the standard deviation of the per-seed gains, the noise a gain must
clear for every seed to win. --plot draws the gain over random against the number of labelled examples (one
line per task and start, every seed a dot): the picture of where pre-training stops paying as labels grow;
with --plot-by pretraining, against the tokens each start was pre-trained on (one line per task and label
budget; pass the results of starts taken along one pre-training run): what more pre-training buys.

usage: python benchmarks/transfer_table.py RESULT.json [RESULT.json ...] [--label FILE=NAME ...] [--json]
       [--tasks spam,...] [--plot PNG [--plot-by labels|pretraining] [--metric accuracy]]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(path: str) -> dict:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise SystemExit(f"{path}: no JSON line of benchmarks/transfer.py in it")
    return json.loads(lines[-1])


def only_tasks(result: dict, tasks: str) -> dict:
    """The result with only the comma-separated ``tasks`` (all of them when empty)."""
    keep = {t for t in tasks.split(",") if t}
    return {**result, "tasks": {k: v for k, v in result["tasks"].items() if not keep or k in keep}}


def error_ratio(start: float, random: float, percent: bool) -> float:
    top = 100.0 if percent else 1.0
    return (top - start) / max(1e-9, top - random)


def rows(result: dict, label: str) -> list[dict]:
    out = []
    budget = result["budget"]
    examples = budget["train_examples"] or "all"
    for task, t in result["tasks"].items():
        means = t["mean"]
        random = means.get("random")
        if random is None:
            continue
        for start, gain in t["gain"].items():
            for metric, value in means[start].items():
                if metric not in random:
                    continue
                per_seed = t["gain_per_seed"][start]
                gains = [g[metric] for g in per_seed if metric in g]
                out.append({
                    "task": task, "examples": examples, "start": f"{label}{start}", "metric": metric,
                    "start_score": value, "random_score": random[metric], "gain": gain[metric],
                    "error_ratio": round(error_ratio(value, random[metric], metric not in ("accuracy", "macro_f1")), 4),
                    "gain_sd": round(statistics.stdev(gains), 4) if len(gains) > 1 else None,
                    "wins": f"{t['wins'][start]}/{len(per_seed)}",
                    "seeds_better": f"{sum(g > 0 for g in gains)}/{len(per_seed)}",
                })  # fmt: skip
    return out


def gain_curves(results: list[tuple[dict, str]], metric: str,
                by: str = "labels") -> dict[tuple[str, str], dict[int, list[float]]]:  # fmt: skip
    """(task, series) -> x -> the per-seed gains over random in ``metric``.

    ``by="labels"``: one series per start, x = labelled examples (a run over all examples, budget 0, is placed
    at the count its runs report). ``by="pretraining"``: one series per label budget, x = the tokens the start
    was pre-trained on (transfer.py records them per start and task)."""
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    for result, label in results:
        for task, t in result["tasks"].items():
            runs = [r for rs in t.get("runs", {}).values() for r in rs]
            examples = result["budget"]["train_examples"] or next((r["train_examples"] for r in runs
                                                                   if r.get("train_examples")), 0)  # fmt: skip
            for start, per_seed in t.get("gain_per_seed", {}).items():
                gains = [g[metric] for g in per_seed if metric in g]
                if by == "labels":
                    series, x = f"{label}{start}", examples
                else:
                    pretraining = result.get("starts", {}).get(start, {}).get(task, {}).get("pretraining") or {}
                    series, x = f"{label}{examples or 'all'} labels", pretraining.get("tokens", 0)
                if gains and x:
                    curves.setdefault((task, series), {}).setdefault(int(x), []).extend(gains)
    return curves


def plot_gains(curves: dict[tuple[str, str], dict[int, list[float]]], path: str, metric: str,
               by: str = "labels") -> None:  # fmt: skip
    """The gain over random against labelled examples (or pre-training tokens): per task and series, the mean
    (line), each seed (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1.0 if by == "labels" else 1e6  # pre-training: millions of tokens
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (task, series), points in sorted(curves.items()):
        xs = sorted(points)
        line = ax.plot([x / scale for x in xs], [sum(points[x]) / len(points[x]) for x in xs], marker="o",
                       label=f"{task}, {series}")[0]  # fmt: skip
        for x in xs:
            ax.scatter([x / scale] * len(points[x]), points[x], s=12, color=line.get_color(), alpha=0.5)
    ax.axhline(0.0, color="black", linewidth=0.8)
    if by == "labels":
        ax.set_xscale("log")
        ax.set_xlabel("labelled training examples")
        ax.set_title("What pre-training buys, by the number of labels")
    else:
        ax.set_xlabel("pre-training tokens of the start (millions)")
        ax.set_title("What pre-training buys, by pre-training")
    ax.set_ylabel(f"{metric}: start - random (dots: seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="files holding transfer.py's JSON line (- for stdin)")
    parser.add_argument("--label", action="append", default=[], metavar="FILE=NAME",
                        help="prefix the starts of FILE with NAME (e.g. bert-)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the Markdown table")
    parser.add_argument("--tasks", default="", help="only these tasks, comma-separated (default: all)")
    parser.add_argument("--plot", default="", metavar="PNG", help="also draw the gain against labelled examples")
    parser.add_argument("--plot-by", choices=("labels", "pretraining"), default="labels",
                        help="--plot's x: labelled examples (default) or the starts' pre-training tokens")  # fmt: skip
    parser.add_argument("--metric", default="accuracy", help="the metric --plot draws (default: accuracy)")
    args = parser.parse_args()
    labels = dict(item.split("=", 1) for item in args.label)
    results = [(only_tasks(load(path), args.tasks), labels.get(path, "")) for path in args.results]
    if args.plot:
        curves = gain_curves(results, args.metric, args.plot_by)
        if not curves:
            what = "" if args.plot_by == "labels" else " of starts with recorded pre-training tokens"
            raise SystemExit(f"--plot: these results hold no per-seed gains in {args.metric!r}{what}")
        plot_gains(curves, args.plot, args.metric, args.plot_by)
    table = [row for result, label in results for row in rows(result, label)]
    if args.json:
        print(json.dumps({"benchmark": "transfer_table", "rows": table}))
        return
    print("| task | labelled examples | start | metric | start score | random | gain | gain sd | error ratio "
          "| seeds won |")  # fmt: skip
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in table:
        sd = "-" if r["gain_sd"] is None else f"{r['gain_sd']:.4f}"
        print(f"| {r['task']} | {r['examples']} | {r['start']} | {r['metric']} | {r['start_score']:.4f} | "
              f"{r['random_score']:.4f} | {r['gain']:+.4f} | {sd} | {r['error_ratio']:.2f} "
              f"| {r['wins']} |")  # fmt: skip


if __name__ == "__main__":
    main()
