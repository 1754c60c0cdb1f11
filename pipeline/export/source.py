"""Pre-trained weights and their lineage, from a training checkpoint or from an export directory.

Both the export and fine-tuning start here. A checkpoint tag (or a run / checkpoints directory, meaning its
newest published tag) is consolidated to one fp32 state dict: ZeRO stages 1-3 through DeepSpeed's
``zero_to_fp32`` (the fp32 master weights, whatever the training precision), stage 0 from the module state.
An export is read back from ``model.safetensors`` and ``config.json``.

The tokenizer a checkpoint was trained with is the one named by the manifest of its shards (path and sha256);
an export carries it (``spiece.model`` + ``tokenizer_meta.json``). Every consumer compares sha256s, so a model
is never paired with a tokenizer it was not trained with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import yaml
from torch import Tensor

from pipeline.config import from_dict
from pipeline.errors import UserError
from pipeline.export.registry import FINETUNED_FORMAT, ORIGIN_FILE
from pipeline.model.config import ModelConfig
from pipeline.tokenizer.spm import MODEL_FILE, Tokenizer, sha256_file
from pipeline.train.checkpoint import MARK, consolidate_checkpoint, find_checkpoint, read_mark

log = logging.getLogger(__name__)

EXPORT_MANIFEST = "manifest.json"
EXPORT_FORMAT = "pipeline-export/1"
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_MODEL_FILE = "spiece.model"


@dataclass
class Pretrained:
    """What a pre-trained starting point provides: architecture, weights (loaded on demand), tokenizer, lineage."""

    kind: str  # "checkpoint" or "export"
    path: Path  # the checkpoint tag directory or the export directory
    model_cfg: ModelConfig
    tokenizer_sha256: str
    tokenizer_dir: Path | None  # where the tokenizer is, when it could be found
    tokenizer_model_file: str = MODEL_FILE
    lineage: dict = field(default_factory=dict)  # step, samples, tokens, mlflow run, data manifest, ...
    training_config: dict = field(default_factory=dict)  # the pre-training run's resolved config

    @cached_property
    def state_dict(self) -> dict[str, Tensor]:
        """Our model's fp32 state dict (``build_model(model_cfg)`` keys; the vocabulary padded as configured)."""
        if self.kind == "checkpoint":
            return consolidate_checkpoint(self.path, self.lineage.get("zero_stage", 0))
        from safetensors.torch import load_file

        from pipeline.model.hf_convert import from_hf_state_dict

        return from_hf_state_dict(self.model_cfg, load_file(self.path / HF_WEIGHTS))

    def tokenizer(self, override: str = "") -> Tokenizer:
        """The tokenizer to use with these weights: ``override`` if given (it must be the same model), else
        the one recorded with them. A different sha256 or vocabulary size is an error."""
        if override:
            directory = Path(override)
            model_file = HF_MODEL_FILE if (directory / HF_MODEL_FILE).is_file() else MODEL_FILE
            tok = Tokenizer(directory, model_file)
        elif self.tokenizer_dir is not None:
            tok = Tokenizer(self.tokenizer_dir, self.tokenizer_model_file)
        else:
            raise UserError(
                f"{self.path}: the tokenizer it was trained with ({self.lineage.get('tokenizer_path')}, "
                f"sha256 {self.tokenizer_sha256[:12]}) was not found; pass it with --tokenizer DIR"
            )
        if tok.sha256 != self.tokenizer_sha256:
            raise UserError(
                f"tokenizer {tok.directory} (sha256 {tok.sha256[:12]}) is not the one {self.path} was trained with "
                f"(sha256 {self.tokenizer_sha256[:12]}): token ids would mean different pieces"
            )
        if tok.vocab_size != self.model_cfg.vocab_size:
            raise UserError(
                f"tokenizer {tok.directory} has {tok.vocab_size} pieces but the model's vocabulary is "
                f"{self.model_cfg.vocab_size}"
            )
        return tok


def _resolve(path_str: str | None) -> Path | None:
    """A path recorded by an earlier stage (relative ones are relative to where that stage ran)."""
    if not path_str:
        return None
    path = Path(path_str)
    return path if path.exists() else None


def _open_checkpoint(spec: str) -> Pretrained:
    tag_dir = find_checkpoint(spec, Path(spec))
    if tag_dir is None:
        raise UserError(f"{spec}: no published checkpoint there")
    mark = read_mark(tag_dir)
    config_file = tag_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{tag_dir}: no config.yaml beside the checkpoint (needed for the model's architecture)")
    train_cfg = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    model_cfg = from_dict(ModelConfig, train_cfg.get("model"), prefix="model")
    shards = (train_cfg.get("data") or {}).get("shards", "")
    manifest_path = _resolve(str(Path(shards) / "manifest.json")) if shards else None
    if manifest_path is None:
        raise UserError(
            f"{tag_dir}: the manifest of its training shards ({shards}/manifest.json) was not found; it names the "
            "tokenizer the model was trained with (run from the directory the training ran in)"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    tok_info = manifest["tokenizer"]
    run_dir = tag_dir.parent.parent
    tracking_uri = (train_cfg.get("tracking") or {}).get("tracking_uri") or (
        f"sqlite:///{(run_dir / 'mlflow.db').resolve()}" if (run_dir / "mlflow.db").is_file() else ""
    )
    lineage = {
        "checkpoint": str(tag_dir),
        "step": mark["step"],
        "samples": mark.get("samples"),
        "tokens": mark.get("tokens"),
        "mlflow_run_id": mark.get("mlflow_run_id"),
        "mlflow_tracking_uri": tracking_uri,
        "zero_stage": mark.get("zero_stage", 0),
        "precision": mark.get("precision"),
        "world_size": mark.get("world_size"),
        "data_manifest": {
            "path": str(manifest_path),
            "sha256": sha256_file(manifest_path),
            "fingerprint": manifest.get("fingerprint"),
        },
        "tokenizer_path": tok_info.get("path"),
        "tokenizer_sha256": tok_info["sha256"],
    }
    tok_dir = _resolve(tok_info.get("path"))
    return Pretrained(
        kind="checkpoint",
        path=tag_dir,
        model_cfg=model_cfg,
        tokenizer_sha256=tok_info["sha256"],
        tokenizer_dir=tok_dir if tok_dir is not None and (tok_dir / MODEL_FILE).is_file() else None,
        lineage=lineage,
        training_config=train_cfg,
    )


def _open_export(directory: Path) -> Pretrained:
    from pipeline.model.hf_convert import from_hf_config

    manifest_file = directory / EXPORT_MANIFEST
    if not manifest_file.is_file():
        raise UserError(f"{directory}: no {EXPORT_MANIFEST}; not an export of `python -m pipeline export`")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("format") == FINETUNED_FORMAT:
        raise UserError(f"{directory} is a fine-tuned model (task {manifest.get('task')}); start from a pre-trained "
                        "export or checkpoint")  # fmt: skip
    if manifest.get("format") != EXPORT_FORMAT:
        raise UserError(f"{directory}: {EXPORT_MANIFEST} is not an export's (format {manifest.get('format')!r})")
    missing = sorted(name for name in manifest.get("files", {}) if not (directory / name).is_file())
    if missing:
        raise UserError(f"{directory}: the export is missing {', '.join(missing)} (listed in its {EXPORT_MANIFEST})")
    for name, record in manifest["files"].items():
        if (directory / name).stat().st_size != record["bytes"]:
            raise UserError(f"{directory}: {name} has {(directory / name).stat().st_size} bytes, the manifest says "
                            f"{record['bytes']} (truncated or replaced)")  # fmt: skip
    hf_config = json.loads((directory / HF_CONFIG).read_text(encoding="utf-8"))
    model_cfg = from_hf_config(SimpleNamespace(**hf_config))
    lineage = {**manifest["lineage"], "export": str(directory)}
    if (directory / ORIGIN_FILE).is_file():  # fetched from the MLflow Model Registry (pipeline.export.registry)
        lineage["registry"] = json.loads((directory / ORIGIN_FILE).read_text(encoding="utf-8"))
    return Pretrained(
        kind="export",
        path=directory,
        model_cfg=model_cfg,
        tokenizer_sha256=manifest["tokenizer"]["sha256"],
        tokenizer_dir=directory,
        tokenizer_model_file=HF_MODEL_FILE,
        lineage=lineage,
        training_config=manifest.get("training_config", {}),
    )


def open_pretrained(spec: str) -> Pretrained:
    """A checkpoint tag, a run or checkpoints directory (its newest published tag), or an export directory."""
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{spec}: no such checkpoint or export")
    if (path / EXPORT_MANIFEST).is_file() or ((path / HF_CONFIG).is_file() and (path / HF_WEIGHTS).is_file()):
        return _open_export(path)
    if (path / "checkpoints").is_dir() and not (path / MARK).is_file():
        path = path / "checkpoints"  # a run directory
    return _open_checkpoint(str(path))
