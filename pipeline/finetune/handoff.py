"""A fine-tuned model as a hand-off directory, registered in the MLflow Model Registry (`finetune --register`).

The best checkpoint (the dev score that selected it is in ``report.json``) is consolidated to fp32 and written
with everything needed to use it without the run directory:

  model.safetensors       the fine-tuned model (body + task head), our parameter names
  manifest.json           format, task (kind, labels, head, pooling, max_seq_len), the model config, the best
                          dev scores, the parent (registered model / export / checkpoint) and sha256 of every file
  config.yaml             the resolved fine-tuning config;   report.json, lineage.json: the run's own
  spiece.model, tokenizer_meta.json                          the tokenizer
  README.md               a short model card

``load_finetuned(directory)`` rebuilds the model and the tokenizer from it. Registering logs the directory as
a model of the fine-tuning run and creates a version tagged with the task, the score and the parent version.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from pipeline.config import to_dict
from pipeline.export.registry import FINETUNED_FORMAT, FORMAT_TAG, RegistryConfig, register
from pipeline.finetune.config import FinetuneJobConfig
from pipeline.tokenizer.spm import META_FILE, Tokenizer, file_record

HANDOFF_DIR = "model"
HUB_TASKS = {"classification": "text-classification", "pair_classification": "text-classification",
             "multiple_choice": "multiple-choice", "squad": "question-answering"}  # fmt: skip


def write_handoff(out: Path, cfg: FinetuneJobConfig, model_cfg, problem, tokenizer: Tokenizer, report: dict,
                  source) -> Path:  # fmt: skip
    """``out/model`` from the run's best checkpoint (atomically); returns the directory."""
    from safetensors.torch import save_file

    from pipeline.export.source import consolidate_checkpoint
    from pipeline.train.checkpoint import read_mark

    best = report.get("best_checkpoint")
    if not best:
        raise RuntimeError(f"{out}: no best checkpoint to hand off (no dev evaluation finished)")
    tag_dir = Path(best)
    state = consolidate_checkpoint(tag_dir, read_mark(tag_dir).get("zero_stage", 0))
    target = out / HANDOFF_DIR
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.float().contiguous() for k, v in state.items()}
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(tag_dir / "config.yaml", tmp / "config.yaml")
    for name in ("report.json", "lineage.json"):
        shutil.copyfile(out / name, tmp / name)
    shutil.copyfile(tokenizer.directory / tokenizer.model_file, tmp / "spiece.model")
    shutil.copyfile(tokenizer.directory / META_FILE, tmp / META_FILE)
    scores = {k: v for k, v in report["best"].items() if isinstance(v, (int, float)) and k != "step"}
    registry = source.lineage.get("registry") or {}
    manifest = {
        "format": FINETUNED_FORMAT,
        "task": {
            "kind": cfg.task.kind,
            "labels": cfg.task.labels,
            "head": problem.head,
            "num_labels": problem.num_labels,
            "pooling": cfg.finetune.pooling,
            "max_seq_len": cfg.task.max_seq_len,
        },
        "model_config": to_dict(model_cfg),
        "metric": report["best"].get("metric"),
        "best": {"step": report["best"].get("step"), **scores},
        "parent": {
            "checkpoint": str(source.path),
            "kind": source.kind,
            "registered_model": registry or None,
            "pretraining_run_id": source.lineage.get("mlflow_run_id"),
        },
        "mlflow_run_id": report.get("mlflow_run_id"),
        "tokenizer": tokenizer.describe(),
        "files": {},
    }
    manifest["files"] = {p.name: file_record(p) for p in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(_card(manifest, cfg), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _card(manifest: dict, cfg: FinetuneJobConfig) -> str:
    task, parent = manifest["task"], manifest["parent"]
    registered = parent.get("registered_model") or {}
    origin = (f"registered model `{registered['name']}` version {registered['version']}" if registered.get("name")
              else f"`{parent['checkpoint']}`")  # fmt: skip
    scores = ", ".join(f"{k} {v:.4f}" for k, v in manifest["best"].items() if k != "step")
    meta = {"library_name": "pytorch", "pipeline_tag": HUB_TASKS.get(task["kind"], "text-classification"),
            "tags": ["pipeline-finetuned", task["kind"]]}  # fmt: skip
    return "\n".join([
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        f"# {Path(cfg.train.output_dir).name}", "",
        f"Fine-tuned by `python -m pipeline finetune` from {origin} for {task['kind']}"
        + (f" (labels {task['labels']})" if task["labels"] else "") + f"; data: `{cfg.data.train.path}`.", "",
        f"Best dev scores (step {manifest['best']['step']}, selected on {manifest['metric']}): {scores}.", "",
        "Load it (our model classes: the task head has no transformers equivalent):", "",
        "```python", "from pipeline.finetune.handoff import load_finetuned", "",
        'model, tokenizer, manifest = load_finetuned("PATH")  # FinetuneModel in eval mode, our Tokenizer',
        "```", "",
    ])  # fmt: skip


def load_finetuned(directory: str | Path):
    """The fine-tuned model (eval mode), its tokenizer and manifest, from a hand-off directory."""
    from safetensors.torch import load_file

    from pipeline.config import from_dict
    from pipeline.finetune.heads import FinetuneModel
    from pipeline.model.config import ModelConfig

    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    task = manifest["task"]
    model = FinetuneModel(from_dict(ModelConfig, manifest["model_config"]), task["head"], task["num_labels"],
                          pooling=task["pooling"])  # fmt: skip
    model.load_state_dict(load_file(directory / "model.safetensors"), strict=True)
    return model.eval(), Tokenizer(directory, "spiece.model"), manifest


def register_finetuned(directory: Path, registry: RegistryConfig, tracking_uri: str, experiment: str) -> dict:
    """The hand-off as a new version of ``registry.name``, tagged with its task, score and parent."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    parent, registered = manifest["parent"], manifest["parent"].get("registered_model") or {}
    metric = manifest["metric"]
    tags = {
        FORMAT_TAG: FINETUNED_FORMAT,
        "task_kind": manifest["task"]["kind"],
        "metric": metric,
        "score": manifest["best"].get(metric),
        "step": manifest["best"]["step"],
        "arch": manifest["model_config"]["arch"],
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "parent_checkpoint": parent["checkpoint"],
        "parent_run_id": parent.get("pretraining_run_id") or "",
        "parent_model_name": registered.get("name", ""),
        "parent_model_version": registered.get("version", ""),
    }
    description = (f"{manifest['task']['kind']} fine-tuned from "
                   f"{registered.get('uri') or parent['checkpoint']}: {metric} {tags['score']}")  # fmt: skip
    return register(directory, RegistryConfig(name=registry.name, alias=registry.alias, flavor="files"), tracking_uri,
                    manifest["mlflow_run_id"], experiment, {k: v for k, v in tags.items() if v != ""}, description,
                    HUB_TASKS[manifest["task"]["kind"]], step=manifest["best"]["step"] or 0)  # fmt: skip
