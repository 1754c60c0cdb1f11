"""Write a Hugging Face model directory: ``config.json``, ``model.safetensors`` and the tokenizer files.

The layout is what ``save_pretrained`` would write, produced without transformers (it is not a runtime
dependency): the weights are renamed by ``pipeline.model.hf_convert`` (which strips the padded vocabulary
rows), tied copies (the MLM decoder / LM head, which are the word embedding) are left out as transformers
itself does, and ``config.json`` holds the architecture's fields.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from pipeline.model.config import ModelConfig
from pipeline.model.hf_convert import to_hf_config_dict, to_hf_state_dict

# By config.json's model_type: a pre-LN GPT is exported as GPT-2 (pipeline.model.hf_convert).
ARCHITECTURES = {"bert": "BertForPreTraining", "openai-gpt": "OpenAIGPTLMHeadModel", "gpt2": "GPT2LMHeadModel"}
# Keys transformers ties to another tensor and therefore never stores.
TIED_KEYS = {"bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"), "gpt": ("lm_head.weight",)}


def hf_config(cfg: ModelConfig) -> dict:
    """The ``config.json`` of an export."""
    fields = to_hf_config_dict(cfg)
    out = {"architectures": [ARCHITECTURES[fields["model_type"]]], **fields, "tie_word_embeddings": True}
    if cfg.arch == "gpt":
        # [PAD] is id 0: sequence classification finds each row's last real token by it.
        out["pad_token_id"] = 0
    return out


def write_hf_model(cfg: ModelConfig, state_dict: dict[str, Tensor], out_dir: Path) -> list[str]:
    """config.json + model.safetensors for our pre-training model's ``state_dict``; returns the file names."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    hf_state = to_hf_state_dict(cfg, state_dict)
    for key in TIED_KEYS[cfg.arch]:
        hf_state.pop(key, None)
    save_file({k: v.float().contiguous() for k, v in hf_state.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    (out_dir / "model.safetensors").chmod(0o644)  # safetensors creates it private; an export is for sharing
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n", encoding="utf-8")
    return ["config.json", "model.safetensors"]
