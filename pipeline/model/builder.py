"""Build a model, or just its transformer body, from a ``ModelConfig``."""

from __future__ import annotations

from torch import Tensor, nn

from pipeline.model.bert import BertForPretraining, Pooler
from pipeline.model.config import ModelConfig
from pipeline.model.gpt import GPTForCausalLM
from pipeline.model.transformer import TransformerBody, init_weights


def build_model(cfg: ModelConfig) -> nn.Module:
    """The pre-training model: ``BertForPretraining`` (arch bert) or ``GPTForCausalLM`` (arch gpt)."""
    return BertForPretraining(cfg) if cfg.arch == "bert" else GPTForCausalLM(cfg)


def build_body(cfg: ModelConfig) -> TransformerBody:
    """A freshly initialised transformer body (embeddings + blocks) for a fine-tuning head to sit on."""
    body = TransformerBody(cfg)
    body.apply(lambda m: init_weights(m, cfg.initializer_range))
    return body


def build_pooler(cfg: ModelConfig) -> Pooler:
    pooler = Pooler(cfg)
    pooler.apply(lambda m: init_weights(m, cfg.initializer_range))
    return pooler


def sub_state_dict(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` with it removed: ``sub_state_dict(sd, "transformer.")`` for a body."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
