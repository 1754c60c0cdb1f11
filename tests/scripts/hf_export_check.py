"""Load an export with plain transformers (no project code) and report what it computes.

Runs under any transformers version (the export must load in 4.57 and 5.x):

    python hf_export_check.py EXPORT_DIR INPUTS_JSON OUTPUT_JSON

INPUTS_JSON holds {"texts": [...], "pairs": [[a, b], ...]}. OUTPUT_JSON gets the version, the tokenizer class,
the token ids and token type ids of every text and pair (with the model's special tokens, truncated to
model_max_length), the ids of the texts without special tokens (not truncated), and the logits of the auto
classes the export is meant for.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)


def check(export_dir: str, texts: list[str], pairs: list[list[str]]) -> dict:
    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(export_dir)
    out = {"transformers": transformers.__version__, "tokenizer_class": type(tok).__name__}
    single = tok(texts, truncation=True)  # to model_max_length, as fine-tuning code does
    out["single_ids"] = single["input_ids"]
    pair = tok([a for a, _ in pairs], [b for _, b in pairs], truncation=True)  # longest first
    out["pair_ids"] = pair["input_ids"]
    out["pair_type_ids"] = pair.get("token_type_ids")
    out["plain_ids"] = tok(texts, add_special_tokens=False)["input_ids"]
    out["special_ids"] = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")}

    config = AutoConfig.from_pretrained(export_dir)
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    classes = {"pretraining": AutoModelForPreTraining, "sequence_classification": AutoModelForSequenceClassification}
    classes["masked_lm" if config.model_type == "bert" else "causal_lm"] = (
        AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    )
    out["models"] = {}
    for name, cls in classes.items():
        model = cls.from_pretrained(export_dir).eval()
        with torch.no_grad():
            result = model(**batch)
        logits = result.prediction_logits if name == "pretraining" and config.model_type == "bert" else result.logits
        entry = {"class": type(model).__name__, "logits": logits.tolist()}
        if name == "pretraining" and config.model_type == "bert":
            entry["nsp_logits"] = result.seq_relationship_logits.tolist()
        out["models"][name] = entry
    out["attention_mask"] = batch["attention_mask"].tolist()
    return out


if __name__ == "__main__":
    export, inputs, output = sys.argv[1:4]
    with open(inputs, encoding="utf-8") as fh:
        spec = json.load(fh)
    with open(output, "w", encoding="utf-8") as fh:
        json.dump(check(export, spec["texts"], spec["pairs"]), fh)
