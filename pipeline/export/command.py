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

and logs the directory as an artifact (export/<tag>) to the pre-training run in MLflow.

example:
  python -m pipeline export --checkpoint runs/debug --output exports/debug
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args, option, to_dict
from pipeline.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class ExportJobConfig:
    """`python -m pipeline export`."""

    checkpoint: str = option(
        "",
        "a checkpoint tag directory, or a run / checkpoints directory (its newest published tag)",
    )
    output: str = option("", "the export directory to write")
    tokenizer: str = option(
        "",
        "the tokenizer directory (default: the one named by the training shards' manifest; must match it)",
    )
    overwrite: bool = option(False, "replace an existing export directory")
    mlflow: bool = option(True, "log the export as an artifact of the checkpoint's MLflow run")
    tracking_uri: str = option(
        "", "MLflow tracking URI of that run (default: the training config's, or the run directory's mlflow.db)"
    )

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
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    log.info("exported %s to %s in %.1f s", source.path, out, time.time() - t0)
    return manifest


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


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(ExportJobConfig, args)
    manifest = export(cfg)
    mlflow_status = log_to_mlflow(Path(cfg.output), manifest, cfg.tracking_uri) if cfg.mlflow else "off"
    print(json.dumps({"output": cfg.output, "architecture": manifest["architecture"], "step": manifest["step"],
                      "tokens": manifest["tokens"], "mlflow_run_id": manifest["mlflow_run_id"],
                      "mlflow": mlflow_status}))  # fmt: skip
    return 0
