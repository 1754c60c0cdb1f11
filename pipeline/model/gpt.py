"""GPT-1 language model: the shared transformer body, causal, with an LM head tied to the token embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.model.config import ModelConfig
from pipeline.model.loss import token_cross_entropy, vocab_logits
from pipeline.model.transformer import TransformerBody, init_weights


@dataclass
class GPTOutput:
    loss: Tensor | None  # mean next-token cross-entropy over labels != -100
    logits: Tensor | None  # (B, T, V) without labels; with labels only if return_logits: (N, V) at labelled positions
    correct: Tensor | None = None  # argmax hits among the labelled positions
    count: Tensor | None = None  # number of labelled positions


class GPTForCausalLM(nn.Module):
    """``model(input_ids, attention_mask, labels) -> GPTOutput``.

    ``labels`` (B, T) are already aligned with the inputs (labels[t] is the token after input t; the loader
    shifts them), -100 where nothing is predicted. With labels, the vocabulary projection runs only at the
    labelled positions, and logits are not returned unless asked for, so they can be freed after the loss.
    ``max_labels_per_row`` (known to the caller from the host copy of the labels) spares the device-to-host
    sync of finding them (see ``token_cross_entropy``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "gpt":
            raise ValueError(f"model.arch: GPTForCausalLM needs arch 'gpt', got {cfg.arch!r}")
        self.cfg = cfg
        self.transformer = TransformerBody(cfg)
        self.apply(lambda m: init_weights(m, cfg.initializer_range))
        with torch.no_grad():  # padded vocabulary rows are never looked up or predicted: keep them inert
            self.transformer.embeddings.word.weight[cfg.vocab_size :].zero_()

    @property
    def lm_head_weight(self) -> Tensor:
        return self.transformer.embeddings.word.weight  # (V_padded, H), tied

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_logits: bool = False,
        max_labels_per_row: int | None = None,
    ) -> GPTOutput:
        hidden = self.transformer(input_ids, None, attention_mask)  # (B, T, H)
        V = self.cfg.vocab_size
        if labels is None:
            logits = vocab_logits(hidden.flatten(0, 1), self.lm_head_weight, None, V)
            return GPTOutput(loss=None, logits=logits.unflatten(0, hidden.shape[:2]))  # (B, T, V)
        lm = token_cross_entropy(hidden, labels, self.lm_head_weight, None, V, chunk_size=self.cfg.loss_chunk_size,
                                 max_labels_per_row=max_labels_per_row)  # fmt: skip
        return GPTOutput(loss=lm.loss, logits=lm.logits if return_logits else None, correct=lm.correct, count=lm.count)
