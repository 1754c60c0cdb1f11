"""The end-of-run report of a fine-tuning run: ``report.json`` and, for classification, a confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.finetune.task import EVAL_DIR, write_json


def plot_confusion(labels: list[str], confusion: list[list[int]], path: Path, title: str) -> Path:
    """A confusion-matrix PNG: counts, rows gold labels, columns predictions, shaded by share of the row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(confusion)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the gold label")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict) -> tuple[dict, list[Path]]:
    """``report.json`` (summary + best and final dev scores) and the confusion matrix; returns the report and
    the files written."""
    eval_dir = out / EVAL_DIR
    history = []
    if (eval_dir / "history.jsonl").is_file():
        history = [json.loads(line) for line in (eval_dir / "history.jsonl").read_text().splitlines() if line]
    best = json.loads((eval_dir / "best.json").read_text()) if (eval_dir / "best.json").is_file() else {}
    report = {
        **summary,
        "best": {"step": best.get("step"), "metric": best.get("metric"), **best.get("metrics", {})},
        "final": history[-1] if history else {},
        "evaluations": len(history),
    }
    files = [out / "report.json"]
    if "confusion" in best:
        report["best"]["confusion"] = best["confusion"]
        report["best"]["labels"] = best["labels"]
        title = f"{summary.get('task', '')} ({summary.get('arch', '')}), dev, step {best.get('step')}"
        files.append(plot_confusion(best["labels"], best["confusion"], out / "confusion_matrix.png", title))
    write_json(out / "report.json", report)
    return report, files
