"""Fine-tune a pre-trained checkpoint (or an export) on a labelled task, through the pre-training loop.

Tasks (task.kind), for BERT and GPT-1 checkpoints alike:
  classification        one text -> a label         BERT [CLS] x [SEP]; GPT-1 [START] x [EXTRACT]
  pair_classification   two texts -> a label        [CLS] a [SEP] b [SEP]; [START] a [DELIM] b [EXTRACT]
  squad                 extractive QA (1.1 / 2.0)   start/end logits, doc stride, n-best, official EM / F1
  multiple_choice       context + K choices         one score per choice, softmax over the choices

The body (and BERT's pooler) comes from init.checkpoint, a new head is initialised randomly (or everything is,
with init.weights=random: the baseline), the body can learn more slowly than the head (finetune.body_lr_scale,
finetune.layer_decay), GPT-1 can add its auxiliary LM loss (finetune.aux_lm_weight). The dev set is scored
every finetune.eval_every steps (default: every epoch); the best checkpoint is kept. Outputs in
train.output_dir: report.json, confusion_matrix.png (classification), eval/ (history, best scores and
predictions), lineage.json, checkpoints/, metrics.jsonl, MLflow (tagged with the pre-training run).
SIGUSR1 / SIGTERM / SIGINT and resuming work as in `train`: a checkpoint at the next step and exit 0; the same
command continues the run, each step and each evaluation logged once.

example:
  python -m pipeline finetune --config configs/finetune/movie-sentiment.yaml --checkpoint runs/debug
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args, to_dict
from pipeline.errors import UserError
from pipeline.finetune.config import FinetuneJobConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, FinetuneJobConfig)


def _file_info(path: str) -> dict | None:
    from pipeline.tokenizer.spm import file_record

    return {"path": path, **file_record(path)} if Path(path).is_file() else None


def finetune(cfg: FinetuneJobConfig, stop=None) -> dict:
    """Run the job; returns the report (rank 0) or the loop's result (other ranks).

    ``stop``: the command's stop-signal handlers (``StopFlags``), installed when it started.
    """
    import torch
    import torch.distributed as dist

    from pipeline.export.source import open_pretrained
    from pipeline.finetune.data import prepare
    from pipeline.finetune.report import write_report
    from pipeline.finetune.task import EVAL_DIR, FinetuneTask, check_packing, restore_eval_records, write_json
    from pipeline.train.checkpoint import find_checkpoint
    from pipeline.train.command import check_paths, preflight
    from pipeline.train.engine import init_distributed
    from pipeline.train.loop import check_batch_config, run_training

    # ---- everything that can be wrong is checked before any process group or weights exist
    if not cfg.init.checkpoint:
        raise UserError("init.checkpoint: a pre-training checkpoint or an export is required (--checkpoint DIR)")
    if not cfg.data.train.path:
        raise UserError("data.train.path: a training file is required")
    world = int(os.environ.get("WORLD_SIZE", 1))
    preflight(cfg, world_size=world, cuda=torch.cuda.is_available())
    if cfg.registry.name and not cfg.tracking.enabled:
        raise UserError("--register: the model is logged to the fine-tuning's MLflow run; tracking.enabled is false")
    if cfg.registry.name and cfg.tracking.tracking_uri:  # the store answers before hours of training
        from pipeline.export.registry import connect

        connect(cfg.tracking.tracking_uri, create=True)
    source = open_pretrained(_local_checkpoint(cfg))
    if "task" in source.training_config:
        raise UserError(f"{cfg.init.checkpoint} is a fine-tuning checkpoint; start from a pre-training one")
    tokenizer = source.tokenizer(cfg.tokenizer)  # sha256 and vocabulary must match the checkpoint's
    model_cfg = source.model_cfg
    if cfg.finetune.dropout is not None:
        model_cfg = replace(model_cfg, hidden_dropout=cfg.finetune.dropout, attention_dropout=cfg.finetune.dropout)
    if cfg.task.max_seq_len > model_cfg.max_position_embeddings:
        raise UserError(
            f"task.max_seq_len {cfg.task.max_seq_len} exceeds the model's {model_cfg.max_position_embeddings} "
            "positions; longer examples are truncated (or strided) to task.max_seq_len, so lower it"
        )
    if cfg.finetune.packing:
        check_packing(cfg, model_cfg.arch)
    prepared = prepare(cfg, tokenizer, model_cfg.arch)
    accumulation = check_batch_config(cfg.train, world)
    batches_per_epoch = -(-len(prepared.train_features) // (cfg.train.micro_batch_size * world))
    steps_per_epoch = max(1, batches_per_epoch // accumulation)
    if cfg.finetune.epochs:
        cfg.train.max_steps = max(1, math.ceil(cfg.finetune.epochs * batches_per_epoch / accumulation))
    eval_every = cfg.finetune.eval_every or steps_per_epoch
    init_state = source.state_dict if cfg.init.weights == "pretrained" else None
    check_paths(cfg)  # before DeepSpeed is imported

    info = init_distributed()
    out = Path(cfg.train.output_dir)
    try:
        registered = source.lineage.get("registry") or {}
        lineage = {
            "init": {
                "checkpoint": cfg.init.checkpoint,
                "kind": source.kind,
                "weights": cfg.init.weights,
                "registered_model": registered or None,
            },
            "pretraining": source.lineage,
            "tokenizer": tokenizer.describe(),
            "model_config": to_dict(model_cfg),
            "data_files": {"train": _file_info(cfg.data.train.path), "dev": _file_info(cfg.data.dev.path)},
            "data": prepared.report,
        }
        if info.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            resume = find_checkpoint(cfg.checkpoint.resume, out)
            if resume is None:
                shutil.rmtree(out / EVAL_DIR, ignore_errors=True)  # scores of an attempt that left no checkpoint
            else:  # the steps after that checkpoint are taken again: scores as they were at that checkpoint
                restore_eval_records(out, resume)
            write_json(out / "lineage.json", lineage)
        if dist.is_initialized():
            dist.barrier()
        task = FinetuneTask(
            cfg, model_cfg, prepared, init_state, info.device, info.rank, info.world_size,
            artifacts=[str(out / "lineage.json")],
        )  # fmt: skip
        parent = source.lineage.get("mlflow_run_id") or ""
        result = run_training(
            task, info, train=cfg.train, optim=cfg.optim, schedule=cfg.schedule, checkpoint=cfg.checkpoint,
            tracking=cfg.tracking, deepspeed_json=cfg.deepspeed.config, full_config=cfg,
            eval_every=eval_every, eval_metric=f"eval_{task.metric}", eval_higher_is_better=True,
            extra_tags={"parent_run_id": parent, "init_checkpoint": str(source.path), "init_weights": cfg.init.weights,
                        "task_kind": cfg.task.kind, "arch": model_cfg.arch, **_registry_tags(cfg, registered)},
            stop=stop,
        )  # fmt: skip
        if info.rank != 0:
            return result
        summary = {
            "task": cfg.task.kind,
            "arch": model_cfg.arch,
            "init": cfg.init.weights,
            "checkpoint": str(source.path),
            "parent_run_id": parent,
            "steps": result["step"],
            "epochs": cfg.finetune.epochs,
            "train_examples": len(prepared.train_examples),
            "dev_examples": len(prepared.dev_examples),
            "data": prepared.report,
            "mlflow_run_id": result["mlflow_run_id"],
            "best_checkpoint": _best_checkpoint(out),
            "stopped_by_signal": result["stopped_by_signal"],  # pre-empted: the same command continues it
        }
        report, files = write_report(out, summary)
        _log_files(cfg, out, result["mlflow_run_id"], [*files, out / EVAL_DIR / "best.json"])
        if cfg.registry.name and result["stopped_by_signal"]:
            log.warning("not registered: the run stopped at step %d of %d", result["step"], cfg.train.max_steps)
        elif cfg.registry.name:
            report["registered"] = _register(cfg, out, model_cfg, prepared.problem, tokenizer, report, source)
            write_json(out / "report.json", report)
        return report
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _local_checkpoint(cfg: FinetuneJobConfig) -> str:
    """init.checkpoint, with a models:/ or runs:/ URI fetched into train.output_dir/init_model first."""
    from pipeline.export.registry import fetch, is_uri
    from pipeline.export.source import EXPORT_MANIFEST

    if not is_uri(cfg.init.checkpoint):
        return cfg.init.checkpoint
    directory, _ = fetch(cfg.init.checkpoint, cfg.tracking.tracking_uri, Path(cfg.train.output_dir) / "init_model",
                         marker=EXPORT_MANIFEST)  # fmt: skip
    return str(directory)


def _registry_tags(cfg: FinetuneJobConfig, registered: dict) -> dict[str, str]:
    """The registered model (and version) fine-tuning started from, as MLflow run tags."""
    if not registered:
        return {}
    tags = {"init_model_uri": cfg.init.checkpoint, "registered_model_name": registered.get("name"),
            "registered_model_version": registered.get("version"), "registered_model_alias": registered.get("alias"),
            "registry_tracking_uri": registered.get("tracking_uri")}  # fmt: skip
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}


def _register(cfg: FinetuneJobConfig, out: Path, model_cfg, problem, tokenizer, report: dict, source) -> dict:
    from pipeline.finetune.handoff import register_finetuned, write_handoff

    directory = write_handoff(out, cfg, model_cfg, problem, tokenizer, report, source)
    uri = cfg.tracking.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    registered = register_finetuned(directory, cfg.registry, uri, cfg.tracking.experiment)
    log.info("registered the best model (%s) as %s", report["best_checkpoint"], registered["uri"])
    return registered


def _best_checkpoint(out: Path) -> str | None:
    from pipeline.train.checkpoint import newest_best_tag

    best = newest_best_tag(out / "checkpoints")
    return str(out / "checkpoints" / best) if best else None


def _log_files(cfg: FinetuneJobConfig, out: Path, run_id: str | None, files: list[Path]) -> None:
    if not (cfg.tracking.enabled and run_id):
        return
    try:
        from mlflow.tracking import MlflowClient

        uri = cfg.tracking.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        client = MlflowClient(tracking_uri=uri)
        for path in files:
            if path.is_file():
                client.log_artifact(run_id, str(path))
    except Exception as exc:  # tracking never fails a finished run
        log.warning("MLflow logging of the report failed (%s: %s)", type(exc).__name__, exc)


def run(args: argparse.Namespace) -> int:
    from pipeline.console import library_output_to_stderr
    from pipeline.train.policy import StopFlags

    stop = StopFlags().install()  # first: a stop signal during start-up is remembered, not fatal
    try:
        cfg = config_from_args(FinetuneJobConfig, args)
        with library_output_to_stderr():
            report = finetune(cfg, stop)
    finally:
        stop.uninstall()
    if "best" in report:
        keep = ("task", "arch", "init", "steps", "best", "final", "best_checkpoint", "mlflow_run_id", "registered",
                "stopped_by_signal")  # fmt: skip
        brief = {k: report[k] for k in keep if k in report}
        brief["best"] = {k: v for k, v in report["best"].items() if k not in ("confusion", "labels")}
        print(json.dumps(brief))
    return 0
