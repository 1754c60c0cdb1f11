"""One table from several `benchmarks/transfer.py` JSON lines: each start beside its own random baseline.

`transfer.py` compares the starts of one architecture against random initialisation of that architecture;
BERT and GPT starts therefore come from separate runs. This reads their JSON lines (files, or `-` for stdin)
and prints, per task and metric, every start with its random baseline, the gain, the ratio of dev errors
(start / random: below 1 is fewer mistakes) and the seeds won, as Markdown (the README's table) and, with
--json, as one JSON line.

usage: python benchmarks/transfer_table.py RESULT.json [RESULT.json ...] [--label FILE=NAME ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str) -> dict:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise SystemExit(f"{path}: no JSON line of benchmarks/transfer.py in it")
    return json.loads(lines[-1])


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
                out.append({
                    "task": task, "examples": examples, "start": f"{label}{start}", "metric": metric,
                    "start_score": value, "random_score": random[metric], "gain": gain[metric],
                    "error_ratio": round(error_ratio(value, random[metric], metric not in ("accuracy", "macro_f1")), 4),
                    "wins": f"{t['wins'][start]}/{len(per_seed)}",
                    "seeds_better": f"{sum(g[metric] > 0 for g in per_seed)}/{len(per_seed)}",
                })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="files holding transfer.py's JSON line (- for stdin)")
    parser.add_argument("--label", action="append", default=[], metavar="FILE=NAME",
                        help="prefix the starts of FILE with NAME (e.g. bert-)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the Markdown table")
    args = parser.parse_args()
    labels = dict(item.split("=", 1) for item in args.label)
    table = [row for path in args.results for row in rows(load(path), labels.get(path, ""))]
    if args.json:
        print(json.dumps({"benchmark": "transfer_table", "rows": table}))
        return
    print("| task | labelled examples | start | metric | start score | random | gain | error ratio | seeds won |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in table:
        print(f"| {r['task']} | {r['examples']} | {r['start']} | {r['metric']} | {r['start_score']:.4f} | "
              f"{r['random_score']:.4f} | {r['gain']:+.4f} | {r['error_ratio']:.2f} | {r['wins']} |")  # fmt: skip


if __name__ == "__main__":
    main()
