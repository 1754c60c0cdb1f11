"""The model section of a config: one dataclass for BERT and GPT-1, and the named size presets.

Presets live in ``configs/model/<name>.yaml`` under a top-level ``model:`` mapping, so a training config can
``include:`` one and get its ``model`` section. Fields whose reference value depends on the architecture
(LayerNorm epsilon, GELU flavour, number of segment types) default to ``None`` and are resolved in
``__post_init__``; the resolved config, saved beside a checkpoint, therefore always names concrete values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, from_dict, load_yaml, option

# The repository's presets; a preset name resolves here, anything else is treated as a path.
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"

# Reference values of the two papers' code (google-research/bert, openai/finetune-transformer-lm).
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": {"layer_norm_eps": 1e-12, "activation": "gelu", "type_vocab_size": 2},
    "gpt": {"layer_norm_eps": 1e-5, "activation": "gelu_tanh", "type_vocab_size": 0},
}


@dataclass
class ModelConfig:
    """Transformer architecture (BERT or GPT-1) and how it is computed."""

    arch: Literal["bert", "gpt"] = option(
        "bert", "bert: bidirectional encoder with MLM + NSP heads; gpt: causal decoder with a tied LM head"
    )
    vocab_size: int = option(30522, "number of real tokens (the trainer sets it from the tokenizer)")
    pad_vocab_multiple: int = option(
        8,
        "embedding rows are padded to a multiple of this so the vocabulary GEMM is aligned for tensor cores; "
        "padded rows stay zero, are never predicted and are stripped at export (1 = no padding)",
    )
    hidden_size: int = option(768, "width of the residual stream (H)")
    num_layers: int = option(12, "number of transformer blocks (L)")
    num_heads: int = option(12, "attention heads per block (A); hidden_size must be divisible by it")
    intermediate_size: int = option(3072, "width of the feed-forward layer (4*H in both papers)")
    max_position_embeddings: int = option(512, "learned positions; the longest sequence the model accepts")
    type_vocab_size: int | None = option(
        None, "segment (token type) embeddings: BERT uses 2, GPT has none (0); None = the arch's value"
    )
    hidden_dropout: float = option(0.1, "dropout on embeddings and on each sub-layer's output")
    attention_dropout: float = option(0.1, "dropout on attention probabilities")
    layer_norm_eps: float | None = option(None, "LayerNorm epsilon; None = the arch's value (BERT 1e-12, GPT 1e-5)")
    activation: Literal["gelu", "gelu_tanh"] | None = option(
        None, "feed-forward GELU: exact (erf, BERT) or tanh approximation (GPT-1); None = the arch's value"
    )
    pre_layernorm: bool = option(
        False,
        "normalise each sub-layer's input (plus a final LayerNorm) instead of its output: more stable for "
        "large batches and deep models, but no longer the papers' (or Hugging Face's) architecture",
    )
    initializer_range: float = option(0.02, "std of the normal initialisation of weights (biases 0, LN weight 1)")
    fused: Literal["auto", "none", "compile"] = option(
        "auto",
        "fused kernels for linear+bias+GELU and linear+bias+dropout+residual(+LayerNorm): none = plain PyTorch "
        "(reference), compile = torch.compile (inductor) of the same functions, auto = compile on CUDA only",
    )
    activation_checkpointing: bool = option(
        False, "recompute each block's activations in backward instead of storing them (less memory, ~30% slower)"
    )
    loss_chunk_size: int = option(
        0,
        "compute the vocabulary projection and its loss over this many predicted tokens at a time, recomputing "
        "each chunk in backward, so full logits never exist at once (0 = all at once)",
    )

    def __post_init__(self) -> None:
        for name, value in _ARCH_DEFAULTS[self.arch].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        positive = ("vocab_size", "pad_vocab_multiple", "hidden_size", "num_layers", "num_heads")
        for name in (*positive, "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.arch == "bert" and self.type_vocab_size < 1:
            raise ConfigError("model.type_vocab_size: BERT needs at least one segment type (2 for NSP pairs)")
        if self.arch == "gpt" and self.type_vocab_size != 0:
            raise ConfigError("model.type_vocab_size: GPT has no segment embeddings; leave it unset or 0")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}: must be in [0, 1), got {getattr(self, name)}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"model.layer_norm_eps: must be > 0, got {self.layer_norm_eps}")
        if not self.initializer_range > 0:
            raise ConfigError(f"model.initializer_range: must be > 0, got {self.initializer_range}")
        if self.loss_chunk_size < 0:
            raise ConfigError(f"model.loss_chunk_size: must be >= 0, got {self.loss_chunk_size}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: vocab_size rounded up to pad_vocab_multiple."""
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_model_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A ``ModelConfig`` from a preset name (``bert-base``) or a YAML file with a ``model:`` section.

    ``overrides`` are field values applied on top (``{"vocab_size": 16000}``), validated with the rest.
    """
    path = Path(name_or_path)
    if not path.is_file():
        candidate = PRESET_DIR / f"{name_or_path}.yaml"
        if not candidate.is_file():
            raise ConfigError(
                f"model preset {str(name_or_path)!r} is neither a file nor one of: {', '.join(list_presets())}"
            )
        path = candidate
    data = load_yaml(path)
    section = data.get("model")
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: expected a top-level 'model:' mapping")
    return from_dict(ModelConfig, {**section, **(overrides or {})}, prefix="model")
