"""Export a pre-training checkpoint as a Hugging Face model directory, with its lineage.

Consolidates the (ZeRO-sharded) DeepSpeed checkpoint to fp32 and writes into --output:

  config.json, model.safetensors     BertForPreTraining / OpenAIGPTLMHeadModel (GPT2LMHeadModel for a pre-LN
                                     GPT) weights (vocabulary padding stripped); load with
                                     AutoModelForPreTraining, AutoModelForMaskedLM (BERT), AutoModelForCausalLM
                                     (GPT), AutoModelForSequenceClassification (new head)
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                     AutoTokenizer: the same ids as our SentencePiece model, BERT's
                                     [CLS] A [SEP] B [SEP] (segment ids 0/1) or GPT-1's [START] A [DELIM] B [EXTRACT]
  spiece.model, tokenizer_meta.json  the SentencePiece model itself (source of truth)
  manifest.json                      sha256 of every file, the training config, the data manifest's sha256,
                                     step, samples and tokens seen, the MLflow run id
  README.md                          the model card: YAML metadata (language, license, pipeline_tag, datasets,
                                     model-index once `evaluate` has run) and what the model is, what it was
                                     trained on and how, how to load it, its known limits

and logs the directory as an artifact (export/<tag>) to the pre-training run in MLflow. With --register NAME it
is logged as an MLflow model of that run instead (the files uploaded once) and registered as a new version of
NAME, tagged with its lineage (step, tokens, data manifest and tokenizer sha256, git commit, objective,
architecture); --alias points an alias at it. The store is the run's (its mlflow.db), or --tracking-uri.

examples:
  python -m pipeline export --checkpoint runs/debug --output exports/debug
  python -m pipeline export --checkpoint runs/debug --output exports/debug --register debug-bert --alias champion
  python -m pipeline finetune --config configs/finetune/spam.yaml --checkpoint models:/debug-bert@champion \
      --tracking-uri sqlite:///runs/debug/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args, option, section, to_dict
from pipeline.errors import UserError
from pipeline.export.card import CardConfig
from pipeline.export.registry import RegistryConfig

log = logging.getLogger(__name__)


@dataclass
class ExportJobConfig:
    """`python -m pipeline export`."""

    checkpoint: str = option(
        "",
        "a checkpoint tag directory, or a run / checkpoints directory (its newest published tag)",
        path=True,
    )
    output: str = option("", "the export directory to write", path=True)
    tokenizer: str = option(
        "",
        "the tokenizer directory (default: the one named by the training shards' manifest; must match it)",
        path=True,
    )
    overwrite: bool = option(False, "replace an existing export directory")
    mlflow: bool = option(True, "log the export as an artifact of the checkpoint's MLflow run")
    tracking_uri: str = option(
        "",
        "MLflow tracking URI of that run and of the registry (default: the training config's, or the run "
        "directory's mlflow.db)",
        aliases=("--tracking-uri",),
    )
    card: CardConfig = section(CardConfig)
    registry: RegistryConfig = section(RegistryConfig)

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint: a checkpoint is required (--checkpoint DIR)")
        if not self.output:
            raise ValueError("output: an output directory is required (--output DIR)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ExportJobConfig)


def export(cfg: ExportJobConfig) -> dict:
    """Write the export (atomically: a temporary directory renamed at the end); returns its manifest."""
    import torch

    from pipeline.export import card
    from pipeline.export.hf import hf_config, write_hf_model
    from pipeline.export.source import EXPORT_FORMAT, EXPORT_MANIFEST, open_pretrained
    from pipeline.export.tokenizer import write_hf_tokenizer
    from pipeline.model.builder import build_model
    from pipeline.tokenizer.spm import file_record
    from pipeline.train.tracking import git_commit

    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it")
    source = open_pretrained(cfg.checkpoint)
    if source.kind != "checkpoint":
        raise UserError(f"{cfg.checkpoint} is already an export")
    if "task" in source.training_config:
        raise UserError(f"{source.path} is a fine-tuning checkpoint; export exports pre-training checkpoints")
    tokenizer = source.tokenizer(cfg.tokenizer)  # checks sha256 and vocabulary size
    if cfg.registry.name:  # the registry answers before anything is written
        from pipeline.export.registry import connect

        connect(registry_store(cfg, source.lineage), create=True)
    model_cfg = source.model_cfg
    state = source.state_dict
    build_model(model_cfg).load_state_dict(state, strict=True)  # the weights are what the config says

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    files = write_hf_model(model_cfg, state, tmp)
    files += write_hf_tokenizer(tokenizer, model_cfg.arch, tmp, model_cfg.max_position_embeddings)
    lineage = source.lineage
    manifest = {
        "format": EXPORT_FORMAT,
        "architecture": hf_config(model_cfg)["architectures"][0],
        "arch": model_cfg.arch,
        "files": {name: file_record(tmp / name) for name in sorted(files)},
        "lineage": lineage,
        "step": lineage["step"],
        "samples": lineage["samples"],
        "tokens": lineage["tokens"],
        "mlflow_run_id": lineage["mlflow_run_id"],
        "data_manifest_sha256": lineage["data_manifest"]["sha256"],
        "tokenizer": tokenizer.describe(),
        "model_config": to_dict(model_cfg),
        "training_config": source.training_config,
        "vocab_padding_stripped": model_cfg.padded_vocab_size - model_cfg.vocab_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
    }
    manifest["card"] = {**to_dict(cfg.card), "name": cfg.card.model_name or cfg.registry.name or out.name,
                        **pretraining_summary(source, tmp / "model.safetensors")}  # fmt: skip
    if cfg.registry.name:
        manifest["card"]["registered"] = {"name": cfg.registry.name, "alias": cfg.registry.alias or None}
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    card.write(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    log.info("exported %s to %s in %.1f s", source.path, out, time.time() - t0)
    return manifest


def registry_store(cfg: ExportJobConfig, lineage: dict) -> str:
    uri = cfg.tracking_uri or lineage.get("mlflow_tracking_uri")
    if not uri:
        raise UserError(f"--register: {lineage.get('checkpoint')} names no MLflow store (trained with tracking "
                        "off); pass --tracking-uri URI")  # fmt: skip
    return uri


def pretraining_summary(source, weights: Path) -> dict:
    """What the card says about the pre-training that only the checkpoint's run can tell: the corpus, the
    parameter count, the last logged metrics, the wall time."""
    import math

    from safetensors import safe_open

    from pipeline.train.checkpoint import read_mark

    lineage = source.lineage
    shards = json.loads(Path(lineage["data_manifest"]["path"]).read_text(encoding="utf-8"))
    inputs = [Path(i["path"]).name for i in shards.get("inputs", [])]
    data = {
        "inputs": inputs,
        "datasets": sorted({name.split(".")[0] for name in inputs}),
        "documents": (shards.get("stats") or {}).get("documents"),
        "tokens": (shards.get("totals") or {}).get("tokens"),
        "samples": (shards.get("totals") or {}).get("samples"),
        "seq_len": shards.get("seq_len"),
    }
    with safe_open(str(weights), "pt") as fh:
        parameters = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118
    out = {"data": data, "parameters": parameters}
    # The last log line at or before the checkpoint's step: the metrics the run ended on.
    metrics_file = source.path.parent.parent / "metrics.jsonl"
    skip = {"step", "lr", "epoch", "tokens_per_s", "samples_per_s", "skipped_nonfinite", "skipped_overflow", "mfu",
            "data_read_errors", "data_samples_substituted"}  # fmt: skip
    if metrics_file.is_file():
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("step", math.inf) <= lineage["step"] and "tokens_per_s" in record:
                out["final_metrics_step"] = record["step"]
                numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and math.isfinite(v)}
                out["final_metrics"] = {k: round(v, 4) for k, v in numbers.items() if k not in skip}
    run_id, uri = lineage.get("mlflow_run_id"), lineage.get("mlflow_tracking_uri")
    if run_id and uri and (not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///") :]).is_file()):
        try:  # wall time: from the MLflow run's start to this checkpoint (restarts included)
            from mlflow.tracking import MlflowClient

            run = MlflowClient(tracking_uri=uri).get_run(run_id)
            saved = time.mktime(time.strptime(read_mark(source.path)["time"], "%Y-%m-%dT%H:%M:%S"))
            seconds = saved - run.info.start_time / 1000
            out["wall_time"] = f"{seconds / 60:.1f} min" if seconds >= 120 else f"{max(seconds, 0):.0f} s"
            if run.data.tags.get("hardware"):
                out["hardware"] = run.data.tags["hardware"]
        except Exception as exc:  # the card says "not recorded"
            log.debug("no wall time from MLflow: %s", exc)
    return out


def log_to_mlflow(out: Path, manifest: dict, tracking_uri: str) -> str:
    """Log the export directory to the pre-training run; returns what happened (never raises)."""
    run_id = manifest["mlflow_run_id"]
    uri = tracking_uri or manifest["lineage"].get("mlflow_tracking_uri")
    if not run_id or not uri:
        return "skipped: the checkpoint names no MLflow run"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        tag = Path(manifest["lineage"]["checkpoint"]).name
        client.log_artifacts(run_id, str(out), artifact_path=f"export/{tag}")
        client.set_tag(run_id, f"export.{tag}", str(out.resolve()))
        return f"logged to run {run_id} as export/{tag}"
    except Exception as exc:  # the export itself is done; tracking is best effort
        log.warning("MLflow logging of the export failed (%s: %s)", type(exc).__name__, exc)
        return f"failed: {type(exc).__name__}: {exc}"


def register_export(cfg: ExportJobConfig, out: Path, manifest: dict) -> dict:
    """The export as a new version of registered model ``cfg.registry.name`` (see pipeline.export.registry)."""
    from pipeline.export.card import PIPELINE_TAGS, objective_tag
    from pipeline.export.registry import FORMAT_TAG, register

    lineage = manifest["lineage"]
    tags = {
        FORMAT_TAG: manifest["format"],
        "step": manifest["step"],
        "tokens": manifest["tokens"],
        "data_manifest_sha256": manifest["data_manifest_sha256"],
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "git_commit": manifest["git_commit"],
        "objective": objective_tag(manifest["arch"], manifest["training_config"]),
        "architecture": manifest["architecture"],
        "arch": manifest["arch"],
        "pretraining_run_id": manifest["mlflow_run_id"] or "",
        "checkpoint": lineage["checkpoint"],
    }
    model = manifest["model_config"]
    description = (f"{manifest['architecture']}, {model['num_layers']} layers x {model['hidden_size']}, "
                   f"{manifest['step']} steps, {manifest['tokens']:,} tokens; "
                   f"exported from {lineage['checkpoint']}")  # fmt: skip
    experiment = manifest["training_config"].get("tracking", {}).get("experiment", "pretrain")
    return register(out, cfg.registry, registry_store(cfg, lineage), manifest["mlflow_run_id"], experiment, tags,
                    description, PIPELINE_TAGS[manifest["arch"]], step=manifest["step"],
                    source_uri=lineage.get("mlflow_tracking_uri") or "")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(ExportJobConfig, args)
    out = Path(cfg.output)
    manifest = export(cfg)
    registered = None
    if cfg.registry.name:
        try:
            registered = register_export(cfg, out, manifest)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # no export left that claims a registration it does not have
            raise
        mlflow_status = f"registered as {registered['uri']} ({registered['flavor']}, run {registered['run_id']})"
    else:
        mlflow_status = log_to_mlflow(out, manifest, cfg.tracking_uri) if cfg.mlflow else "off"
    print(json.dumps({"output": cfg.output, "architecture": manifest["architecture"], "step": manifest["step"],
                      "tokens": manifest["tokens"], "mlflow_run_id": manifest["mlflow_run_id"],
                      "mlflow": mlflow_status, "registered": registered}))  # fmt: skip
    if registered:
        print(f"load it: mlflow.artifacts.download_artifacts({registered['uri']!r}) with MLFLOW_TRACKING_URI="
              f"{registered['tracking_uri']}, or fine-tune from it: python -m pipeline finetune --checkpoint "
              f"{registered['uri']} --tracking-uri {registered['tracking_uri']}", file=sys.stderr)  # fmt: skip
    return 0
