"""Weights both ways between our models and Hugging Face's ``BertForPreTraining`` / ``OpenAIGPTLMHeadModel`` /
``GPT2LMHeadModel``.

The state-dict functions are plain tensor renames and need no transformers; only building a transformers
config or model imports it, lazily (it is a dev/test dependency, not a runtime one).

Differences handled here:
* we keep q, k and v as one (3H, H) matrix; Hugging Face BERT has three, GPT-1 one fused ``c_attn``;
* GPT-1's ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``;
* our embedding table may be padded to a multiple of 8 rows: export strips the padding (fine-tuning code
  sizes its softmax from the embedding, and padded rows once silently corrupted scores, NVIDIA
  DeepLearningExamples #1154); import pads with zero rows again.
* a pre-LN GPT is GPT-2's block (LayerNorm before each sublayer, a final ``ln_f``) and goes to GPT-2's classes,
  with the same per-layer names as GPT-1's; a post-LN GPT goes to OpenAIGPT's. Pre-LN BERT has no Hugging
  Face counterpart and is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.model.config import ModelConfig
from pipeline.tokenizer.special import SPECIAL_IDS

# Hugging Face's names for GELU: BERT's ACT2FN spelling, GPT-1's `afn` (where "gelu" means the tanh form).
_BERT_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_BERT_ACT_BACK = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


# GPT-2's activation_function names (its "gelu" is exact, "gelu_new" the tanh form).
_GPT2_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_GPT2_ACT_BACK = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


# Config fields that map one to one, Hugging Face's name -> ours; read in both directions (export and import).
_BERT_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "initializer_range": "initializer_range",
    "layer_norm_eps": "layer_norm_eps",
}
# GPT-1's and GPT-2's configs spell these alike.
_GPT_FIELDS = {
    "vocab_size": "vocab_size",
    "n_positions": "max_position_embeddings",
    "n_embd": "hidden_size",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "resid_pdrop": "hidden_dropout",
    "attn_pdrop": "attention_dropout",
    "layer_norm_epsilon": "layer_norm_eps",
    "initializer_range": "initializer_range",
}


def _theirs(cfg: ModelConfig, names: dict[str, str]) -> dict[str, Any]:
    return {theirs: getattr(cfg, ours) for theirs, ours in names.items()}


def _ours(hf_config, names: dict[str, str]) -> dict[str, Any]:
    return {ours: getattr(hf_config, theirs) for theirs, ours in names.items()}


def is_gpt2(cfg: ModelConfig) -> bool:
    """A pre-LN GPT: exported as Hugging Face GPT-2."""
    return cfg.arch == "gpt" and cfg.pre_layernorm


def _check_exportable(cfg: ModelConfig) -> None:
    if cfg.pre_layernorm and cfg.arch == "bert":
        raise ValueError("model.pre_layernorm: Hugging Face BERT is post-LN; cannot convert a pre-LN BERT")
    if cfg.arch == "gpt" and not cfg.pre_layernorm:
        if cfg.activation != "gelu_tanh":
            raise ValueError("model.activation: OpenAIGPT's GELU is the tanh approximation; cannot convert exact gelu")
        if cfg.intermediate_size != 4 * cfg.hidden_size:
            raise ValueError("model.intermediate_size: OpenAIGPT fixes the MLP width at 4 * hidden_size")


def _unpad(t: Tensor, cfg: ModelConfig) -> Tensor:
    # A copy, not a view: a saved view would carry the padded storage along with it.
    return t[: cfg.vocab_size].clone() if t.size(0) > cfg.vocab_size else t


def _pad(t: Tensor, cfg: ModelConfig) -> Tensor:
    if t.size(0) > cfg.vocab_size:
        raise ValueError(f"model.vocab_size: checkpoint has {t.size(0)} rows, config says {cfg.vocab_size}")
    extra = cfg.padded_vocab_size - t.size(0)
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra else t


# Per-layer names: ours -> BERT's (q/k/v handled separately).
_BERT_LAYER = {
    "attn.proj": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "fc": "intermediate.dense",
    "proj": "output.dense",
    "norm2": "output.LayerNorm",
}
_BERT_TOP = {
    "transformer.embeddings.position.weight": "bert.embeddings.position_embeddings.weight",
    "transformer.embeddings.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
    "transformer.embeddings.norm.weight": "bert.embeddings.LayerNorm.weight",
    "transformer.embeddings.norm.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.dense.weight": "bert.pooler.dense.weight",
    "pooler.dense.bias": "bert.pooler.dense.bias",
    "mlm_transform.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_transform.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_transform.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_transform.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_bias": "cls.predictions.bias",
    "nsp_head.weight": "cls.seq_relationship.weight",
    "nsp_head.bias": "cls.seq_relationship.bias",
}
_GPT_LAYER = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "norm1": "ln_1", "fc": "mlp.c_fc"}
_GPT_LAYER.update({"proj": "mlp.c_proj", "norm2": "ln_2"})
_GPT_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Names outside the layers, ours -> theirs: GPT-1's, GPT-2's (whose final ln_f pre-LN adds); the word
# embedding (padded, and tied to lm_head) is handled apart. The per-layer names are the same in both.
_GPT_WORD = {False: "transformer.tokens_embed.weight", True: "transformer.wte.weight"}
_GPT_TOP = {False: {"transformer.embeddings.position.weight": "transformer.positions_embed.weight"}}
_GPT_TOP[True] = {"transformer.embeddings.position.weight": "transformer.wpe.weight"}
_GPT_TOP[True].update({f"transformer.final_norm.{p}": f"transformer.ln_f.{p}" for p in ("weight", "bias")})


def to_hf_state_dict(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> the state dict of ``BertForPreTraining`` or ``OpenAIGPTLMHeadModel`` (tied keys included)."""
    _check_exportable(cfg)
    sd = {k: v.detach() for k, v in state_dict.items()}
    word = _unpad(sd["transformer.embeddings.word.weight"], cfg)
    out: dict[str, Tensor] = {}
    if cfg.arch == "bert":
        out["bert.embeddings.word_embeddings.weight"] = word
        out["cls.predictions.decoder.weight"] = word
        for ours, theirs in _BERT_TOP.items():
            out[theirs] = sd[ours]
        out["cls.predictions.decoder.bias"] = sd["mlm_bias"]
        for i in range(cfg.num_layers):
            src, dst = f"transformer.layers.{i}.", f"bert.encoder.layer.{i}."
            for part in ("weight", "bias"):
                q, k, v = sd[f"{src}attn.qkv.{part}"].chunk(3, dim=0)
                out[f"{dst}attention.self.query.{part}"] = q
                out[f"{dst}attention.self.key.{part}"] = k
                out[f"{dst}attention.self.value.{part}"] = v
                for ours, theirs in _BERT_LAYER.items():
                    out[f"{dst}{theirs}.{part}"] = sd[f"{src}{ours}.{part}"]
    else:
        out[_GPT_WORD[is_gpt2(cfg)]] = word
        out["lm_head.weight"] = word
        for ours, theirs in _GPT_TOP[is_gpt2(cfg)].items():
            out[theirs] = sd[ours]
        for i in range(cfg.num_layers):
            src, dst = f"transformer.layers.{i}.", f"transformer.h.{i}."
            for ours, theirs in _GPT_LAYER.items():
                weight = sd[f"{src}{ours}.weight"]
                out[f"{dst}{theirs}.weight"] = weight.t() if theirs in _GPT_CONV1D else weight
                out[f"{dst}{theirs}.bias"] = sd[f"{src}{ours}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``BertForPreTraining`` / ``OpenAIGPTLMHeadModel`` state dict -> ours (load with ``load_state_dict``)."""
    _check_exportable(cfg)
    sd = {k: v.detach() for k, v in hf_state_dict.items()}
    out: dict[str, Tensor] = {}
    if cfg.arch == "bert":
        out["transformer.embeddings.word.weight"] = _pad(sd["bert.embeddings.word_embeddings.weight"], cfg)
        for ours, theirs in _BERT_TOP.items():
            out[ours] = sd[theirs]
        for i in range(cfg.num_layers):
            src, dst = f"bert.encoder.layer.{i}.", f"transformer.layers.{i}."
            for part in ("weight", "bias"):
                qkv = [sd[f"{src}attention.self.{name}.{part}"] for name in ("query", "key", "value")]
                out[f"{dst}attn.qkv.{part}"] = torch.cat(qkv, dim=0)
                for ours, theirs in _BERT_LAYER.items():
                    out[f"{dst}{ours}.{part}"] = sd[f"{src}{theirs}.{part}"]
    else:
        out["transformer.embeddings.word.weight"] = _pad(sd[_GPT_WORD[is_gpt2(cfg)]], cfg)
        for ours, theirs in _GPT_TOP[is_gpt2(cfg)].items():
            out[ours] = sd[theirs]
        for i in range(cfg.num_layers):
            src, dst = f"transformer.h.{i}.", f"transformer.layers.{i}."
            for ours, theirs in _GPT_LAYER.items():
                weight = sd[f"{src}{theirs}.weight"]
                out[f"{dst}{ours}.weight"] = weight.t() if theirs in _GPT_CONV1D else weight
                out[f"{dst}{ours}.bias"] = sd[f"{src}{theirs}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The fields of a ``BertConfig`` / ``OpenAIGPTConfig`` / ``GPT2Config`` describing ``cfg``, as a plain dict (with
    ``model_type``): what ``config.json`` of an export holds, written without importing transformers."""
    _check_exportable(cfg)
    if cfg.arch == "bert":
        return dict(
            model_type="bert",
            **_theirs(cfg, _BERT_FIELDS),
            hidden_act=_BERT_ACT[cfg.activation],
            pad_token_id=0,  # pipeline.tokenizer.special: [PAD] is always id 0
        )
    # Each GPT adds its own activation (and GPT-2 its MLP width); our one dropout also drops the embeddings.
    gpt = dict(**_theirs(cfg, _GPT_FIELDS), embd_pdrop=cfg.hidden_dropout)
    if is_gpt2(cfg):
        return dict(
            model_type="gpt2",
            **gpt,
            n_inner=cfg.intermediate_size,
            activation_function=_GPT2_ACT[cfg.activation],
            # GPT2Config defaults to GPT-2's own 50256, outside this vocabulary: generation starts at [START]
            # and ends where pre-training ended documents, at [EOD] (pipeline.tokenizer.special).
            bos_token_id=SPECIAL_IDS.start,
            eos_token_id=SPECIAL_IDS.eod,
        )
    # OpenAIGPT's "gelu" is gelu_new, the tanh approximation GPT-1 used
    return dict(model_type="openai-gpt", **gpt, afn="gelu")


def to_hf_config(cfg: ModelConfig, **extra: Any):
    """A ``transformers.BertConfig`` / ``OpenAIGPTConfig`` / ``GPT2Config`` describing ``cfg`` (``extra`` is passed
    through)."""
    fields = to_hf_config_dict(cfg)
    del fields["model_type"]
    if cfg.arch == "bert":
        from transformers import BertConfig

        return BertConfig(**fields, **extra)
    if is_gpt2(cfg):
        from transformers import GPT2Config

        return GPT2Config(**fields, **extra)
    from transformers import OpenAIGPTConfig

    return OpenAIGPTConfig(**fields, **extra)


def from_hf_config(hf_config, **overrides: Any) -> ModelConfig:
    """A ``ModelConfig`` from a ``BertConfig``, ``OpenAIGPTConfig`` or ``GPT2Config`` (``overrides`` for fields
    like ``fused``)."""
    if hf_config.model_type == "bert":
        if hf_config.hidden_act not in _BERT_ACT_BACK:
            raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not a GELU this model implements")
        fields = dict(arch="bert", **_ours(hf_config, _BERT_FIELDS), activation=_BERT_ACT_BACK[hf_config.hidden_act])
    elif hf_config.model_type == "openai-gpt":
        if hf_config.afn != "gelu":
            raise ValueError(f"afn {hf_config.afn!r}: only OpenAIGPT's 'gelu' (tanh approximation) is implemented")
        fields = dict(
            arch="gpt", **_ours(hf_config, _GPT_FIELDS), intermediate_size=4 * hf_config.n_embd, activation="gelu_tanh"
        )
    elif hf_config.model_type == "gpt2":
        if hf_config.activation_function not in _GPT2_ACT_BACK:
            raise ValueError(f"activation_function {hf_config.activation_function!r} is not a GELU implemented here")
        variants = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
        if any(getattr(hf_config, v, False) for v in variants) or not getattr(hf_config, "scale_attn_weights", True):
            raise ValueError(f"GPT-2 attention variants ({', '.join(variants)}, unscaled) are not implemented")
        fields = dict(
            arch="gpt",
            **_ours(hf_config, _GPT_FIELDS),
            pre_layernorm=True,
            intermediate_size=getattr(hf_config, "n_inner", None) or 4 * hf_config.n_embd,
            activation=_GPT2_ACT_BACK[hf_config.activation_function],
        )
    else:
        raise ValueError(f"unsupported Hugging Face model type {hf_config.model_type!r} (bert, openai-gpt or gpt2)")
    return ModelConfig(**{**fields, **overrides})


def to_hf_model(model, **config_extra: Any):
    """A Hugging Face ``BertForPreTraining`` / ``OpenAIGPTLMHeadModel`` / ``GPT2LMHeadModel`` holding ``model``'s
    weights."""
    from transformers import BertForPreTraining, GPT2LMHeadModel, OpenAIGPTLMHeadModel

    hf_config = to_hf_config(model.cfg, **config_extra)
    classes = {"bert": BertForPreTraining, "openai-gpt": OpenAIGPTLMHeadModel, "gpt2": GPT2LMHeadModel}
    cls = classes[hf_config.model_type]
    hf_model = cls(hf_config)
    hf_model.load_state_dict(to_hf_state_dict(model.cfg, model.state_dict()), strict=True)
    return hf_model.eval()


def from_hf_model(hf_model, **overrides: Any):
    """Our model (``build_model``) holding a Hugging Face model's weights."""
    from pipeline.model.builder import build_model

    cfg = from_hf_config(hf_model.config, **overrides)
    model = build_model(cfg)
    model.load_state_dict(from_hf_state_dict(cfg, hf_model.state_dict()), strict=True)
    return model.eval()
