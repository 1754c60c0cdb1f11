"""Evaluate a pre-trained model: fine-tune it on a suite of tasks, against random initialisation if asked.

Each task of the suite (a configs/finetune preset) is fine-tuned from the checkpoint with the suite's budget
(examples, epochs, learning rate, seeds) and, with --baseline random, from random initialisation of the same
architecture and tokenizer with the same budget (pipeline/evaluate/transfer.py, which benchmarks/transfer.py
shares). Tasks whose data is not on this machine are skipped and listed. Outputs in --output:

  evaluation.json   per task: the per-seed runs, the mean scores, gains over random, error ratio, seeds won
  evaluation.md     one table, one row per task (the task's metrics, the gain over random)
  evaluation.png    a bar per task and start (seeds as dots)
  runs/             the fine-tuning runs (kept with --keep-runs)

The results are also logged to the model's MLflow run (metrics eval/<task>/<metric>, the files under
evaluation/) and, for a registered model, as tags of its version (eval.<task>.<metric>) and its description;
an export directory gets them in its model card (README.md, model-index) and evaluation.json.

examples:
  python -m pipeline evaluate --checkpoint exports/demo --baseline random
  python -m pipeline evaluate --checkpoint models:/demo-bert@champion --suite configs/evaluate/quick.yaml \\
      --tracking-uri sqlite:///runs/demo-pretrain/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import add_config_arguments, config_from_args, load_yaml, option, section
from pipeline.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class SuiteConfig:
    """What `evaluate` runs (a --suite YAML holds these fields): fine-tuning presets and every run's budget."""

    tasks: list[str] = option(
        ["spam", "movie-sentiment", "vitaminc", "social-iqa", "squad11"],
        "configs/finetune presets or fine-tuning YAML files; those whose data is not here are skipped and listed",
        path=lambda value: value.endswith((".yaml", ".yml")),
    )
    seeds: list[int] = option([1234], "training seeds: one run per task, start and seed")
    train_examples: int = option(2400, "a seeded subset of at most this many training examples (0: all)")
    dev_examples: int = option(1000, "a seeded subset of at most this many dev examples (0: all)")
    epochs: float | None = option(3.0, "fine-tuning epochs (none: the preset's)")
    lr: float | None = option(5e-4, "learning rate of every run (none: the preset's)")
    overrides: list[str] = option([], "more `finetune` arguments for every run, e.g. [--finetune.pooling, mean]")
    task_overrides: dict[str, list[str]] = option({}, "more `finetune` arguments for one task's runs, by task")

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("suite.tasks: at least one task")
        if not self.seeds:
            raise ValueError("suite.seeds: at least one seed")
        if self.train_examples < 0 or self.dev_examples < 0:
            raise ValueError("suite.train_examples and suite.dev_examples must be >= 0")


@dataclass
class EvaluateJobConfig:
    """`python -m pipeline evaluate`."""

    checkpoint: str = option(
        "",
        "what to evaluate: a pre-training checkpoint or run directory, an export, or models:/NAME/VERSION, "
        "models:/NAME@ALIAS, runs:/RUN_ID/PATH",
        aliases=("--checkpoint",),
        path=True,
    )
    baseline: Literal["none", "random"] = option(
        "none", "random: also fine-tune from random initialisation with the same budget (the gain column)",
        aliases=("--baseline",),
    )  # fmt: skip
    output: str = option(
        "", "directory of the report (default: runs/evaluate-<model name>)", aliases=("--output",), path=True
    )
    tracking_uri: str = option(
        "",
        "the MLflow store of the registry (models:/ URIs; else MLFLOW_TRACKING_URI) and of the model's run "
        "(default: the one its checkpoint names)",
        aliases=("--tracking-uri",),
    )
    mlflow: bool = option(True, "log the report to the model's MLflow run and registered version")
    update_card: bool = option(True, "write the results into the export's model card (README.md model-index)")
    keep_runs: bool = option(False, "keep the fine-tuning runs under OUTPUT/runs", aliases=("--keep-runs",))
    suite: SuiteConfig = section(SuiteConfig)

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint: what to evaluate is required (--checkpoint DIR or models:/NAME/VERSION)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", metavar="YAML", help="the suite: a YAML of the suite section's fields "
                        "(configs/evaluate/); --suite.FIELD overrides one")  # fmt: skip
    add_config_arguments(parser, EvaluateJobConfig)


def available(tasks: list[str]) -> tuple[list[str], dict[str, str]]:
    """The tasks whose data files exist (paths resolved as `finetune` resolves them), and why the others are out."""
    from pipeline.evaluate.transfer import preset_path, task_name
    from pipeline.finetune.config import FinetuneJobConfig

    keep, skipped = [], {}
    for task in tasks:
        data = load_yaml(preset_path(task), FinetuneJobConfig).get("data", {})
        paths = [(data.get(split) or {}).get("path") for split in ("train", "dev")]
        missing = [p for p in paths if p and not Path(p).exists()]
        if missing:
            skipped[task_name(task)] = f"no data here: {', '.join(missing)}"
        else:
            keep.append(task)
    return keep, skipped


def evaluate(cfg: EvaluateJobConfig) -> dict:
    from pipeline.evaluate.transfer import Budget, compare, markdown_table, plot
    from pipeline.export.registry import fetch, is_uri
    from pipeline.export.source import EXPORT_MANIFEST, open_pretrained

    tasks, skipped = available(cfg.suite.tasks)
    for task, why in skipped.items():
        log.warning("skipping %s: %s", task, why)
    if not tasks:
        reasons = "; ".join(f"{t}: {w}" for t, w in skipped.items())
        raise UserError(f"no task of the suite has its data here ({reasons})")
    origin = None
    if is_uri(cfg.checkpoint):
        name = cfg.checkpoint.split(":/", 1)[1].replace("/", "-").replace("@", "-")
        out = Path(cfg.output or f"runs/evaluate-{name}")
        local, origin = fetch(cfg.checkpoint, cfg.tracking_uri, out / "model", marker=EXPORT_MANIFEST)
    else:
        local = Path(cfg.checkpoint)
        out = Path(cfg.output or f"runs/evaluate-{local.resolve().name}")
    source = open_pretrained(str(local))
    if "task" in source.training_config:
        raise UserError(f"{cfg.checkpoint} is a fine-tuning checkpoint; evaluate evaluates pre-trained models")
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(train_examples=cfg.suite.train_examples, dev_examples=cfg.suite.dev_examples,
                    epochs=cfg.suite.epochs, lr=cfg.suite.lr, seeds=cfg.suite.seeds, overrides=cfg.suite.overrides,
                    task_overrides=cfg.suite.task_overrides)  # fmt: skip
    runs = out / "runs"

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = compare({"pretrained": str(source.path)}, tasks, budget, runs, baseline=cfg.baseline == "random",
                         progress=progress)  # fmt: skip
    finally:
        if not cfg.keep_runs:
            shutil.rmtree(runs, ignore_errors=True)
    result.update(benchmark="evaluate", checkpoint=cfg.checkpoint, skipped=skipped, registered=origin,
                  created=time.strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
    files = [_write_json(out / "evaluation.json", result)]
    (out / "evaluation.md").write_text(markdown_table(result) + "\n", encoding="utf-8")
    files += [out / "evaluation.md", plot(result, out / "evaluation.png")]
    card = _update_card(source, result) if cfg.update_card and source.kind == "export" else None
    if card:
        files.append(card)
    status = _log_to_mlflow(cfg, source, origin, result, files) if cfg.mlflow else "off"
    return {"output": str(out), "files": [str(f) for f in files], "mlflow": status, "card": str(card) if card else None,
            "result": result}  # fmt: skip


def _write_json(path: Path, data: dict) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _update_card(source, result: dict) -> Path:
    """evaluation.json beside the export and its card rewritten with the results (model-index)."""
    from pipeline.export import card
    from pipeline.export.source import EXPORT_MANIFEST

    manifest = json.loads((source.path / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    _write_json(source.path / card.EVALUATION_FILE, result)
    return card.write(source.path, manifest)


def _log_to_mlflow(cfg: EvaluateJobConfig, source, origin: dict | None, result: dict, files: list[Path]) -> str:
    """Metrics and files to the model's run; tags and description to its registered version (best effort)."""
    from pipeline.evaluate.transfer import markdown_table

    run_id = (origin or {}).get("run_id") or source.lineage.get("mlflow_run_id")
    uri = (origin or {}).get("tracking_uri") or cfg.tracking_uri or source.lineage.get("mlflow_tracking_uri")
    if not run_id or not uri:
        return "skipped: the model names no MLflow run"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        step = int(source.lineage.get("step") or 0)
        for task, t in result["tasks"].items():
            for metric in t["metrics"]:
                client.log_metric(run_id, f"eval/{task}/{metric}", t["mean"]["pretrained"][metric], step=step)
                if "pretrained" in t["gain"]:
                    client.log_metric(run_id, f"eval/{task}/{metric}_gain", t["gain"]["pretrained"][metric], step=step)
        for path in files:
            client.log_artifact(run_id, str(path), "evaluation")
        status = f"logged to run {run_id}"
        if origin and origin.get("name"):
            name, version = origin["name"], str(origin["version"])
            for task, t in result["tasks"].items():
                for metric in t["metrics"]:
                    value = t["mean"]["pretrained"][metric]
                    client.set_model_version_tag(name, version, f"eval.{task}.{metric}", value)
            description = client.get_model_version(name, version).description or ""
            description = description.split("\n\nEvaluation", 1)[0]
            client.update_model_version(name, version, description=f"{description}\n\nEvaluation "
                                        f"({time.strftime('%Y-%m-%d')}):\n\n{markdown_table(result)}")  # fmt: skip
            status += f" and version {version} of {name}"
        return status
    except Exception as exc:  # the report is written; tracking is best effort
        log.warning("MLflow logging of the evaluation failed (%s: %s)", type(exc).__name__, exc)
        return f"failed: {type(exc).__name__}: {exc}"


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluate.transfer import format_table

    suite = {"suite": load_yaml(args.suite, SuiteConfig)} if args.suite else None
    cfg = config_from_args(EvaluateJobConfig, args, extra=suite)
    summary = evaluate(cfg)
    print(format_table(summary["result"]), file=sys.stderr)
    brief = {k: v for k, v in summary.items() if k != "result"}
    brief["tasks"] = {t: {"metrics": r["metrics"], "mean": r["mean"], "gain": r["gain"]}
                      for t, r in summary["result"]["tasks"].items()}  # fmt: skip
    brief["skipped"] = summary["result"]["skipped"]
    print(json.dumps(brief))
    return 0
