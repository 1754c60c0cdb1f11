"""BERT and GPT-1 models: one transformer body, fused kernels, Hugging Face-compatible weights.

No distributed code lives here: the trainer wraps these modules. ``hf_convert`` (which imports
transformers lazily) converts state dicts both ways.
"""

from pipeline.model.bert import BertForPretraining, BertPretrainOutput, MLMTransform, Pooler
from pipeline.model.builder import build_body, build_model, build_pooler, sub_state_dict
from pipeline.model.config import ModelConfig, list_presets, load_model_preset
from pipeline.model.flops import flops_per_token
from pipeline.model.gpt import GPTForCausalLM, GPTOutput
from pipeline.model.transformer import Block, Embeddings, TransformerBody

__all__ = [
    "BertForPretraining",
    "BertPretrainOutput",
    "Block",
    "Embeddings",
    "GPTForCausalLM",
    "GPTOutput",
    "MLMTransform",
    "ModelConfig",
    "Pooler",
    "TransformerBody",
    "build_body",
    "build_model",
    "build_pooler",
    "flops_per_token",
    "list_presets",
    "load_model_preset",
    "sub_state_dict",
]
