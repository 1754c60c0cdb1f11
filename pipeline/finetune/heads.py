"""Fine-tuning models: the pre-trained transformer body with a new, randomly initialised head.

* ``classify``: BERT reads the pooled [CLS] state (the pre-trained pooler, as in the paper), GPT-1 the final
  state of its extract token; dropout, then a linear layer to the classes. ``pooling="mean"`` reads the mean of
  the final states over the real tokens instead (Sentence-BERT's pooling; for a causal model every position's
  state, each summarising its prefix).
* ``choice``: the same with one output; inputs are (B, K, T), one sequence per choice, giving (B, K) scores
  (padded choices are masked) for a softmax over the choices.
* ``span``: a linear layer on every token's final state gives start and end logits (SQuAD).

GPT-1's auxiliary objective (language modelling on the fine-tuning inputs) uses the LM head tied to the token
embedding, as in pre-training. Parameter names keep pre-training's ``transformer.*`` / ``pooler.*`` so that
weights load by name and ``lr_scale`` prefixes address the body and the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.bert import Pooler
from pipeline.model.config import ModelConfig
from pipeline.model.loss import IGNORE_INDEX, TokenLoss, token_cross_entropy
from pipeline.model.transformer import TransformerBody, init_weights

HEAD_OUTPUTS = {"span": 2, "choice": 1}
POOLINGS = ("summary", "mean")


@dataclass
class FinetuneOutput:
    logits: Tensor  # classify (B, C); choice (B, K); span (B, T, 2)
    lm: TokenLoss | None = None  # GPT-1 auxiliary LM loss, when lm_labels were given


class FinetuneModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, head: str, num_labels: int = 0, head_dropout: float = 0.1, pooling: str = "summary"
    ):
        super().__init__()
        if head not in ("classify", "choice", "span"):
            raise ValueError(f"head must be classify, choice or span, got {head!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.cfg = cfg
        self.head_kind = head
        self.pooling = pooling
        self.transformer = TransformerBody(cfg)
        pooled_cls = cfg.arch == "bert" and head != "span" and pooling == "summary"
        self.pooler = Pooler(cfg) if pooled_cls else None
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(cfg.hidden_size, HEAD_OUTPUTS.get(head, num_labels))
        self.apply(lambda m: init_weights(m, cfg.initializer_range))
        with torch.no_grad():  # padded vocabulary rows stay inert, as in pre-training
            self.transformer.embeddings.word.weight[cfg.vocab_size :].zero_()

    def load_pretrained(self, state_dict: dict[str, Tensor]) -> list[str]:
        """Load the body (and pooler) from a pre-training state dict; returns the names left as initialised
        (the head). Anything else missing is an error."""
        wanted = {k: v for k, v in state_dict.items() if k.startswith(("transformer.", "pooler."))}
        if self.pooler is None:
            wanted = {k: v for k, v in wanted.items() if not k.startswith("pooler.")}
        missing, unexpected = self.load_state_dict(wanted, strict=False)
        body_missing = [k for k in missing if not k.startswith(("head.", "pooler."))]
        if body_missing or unexpected:
            raise ValueError(f"pre-trained weights do not fit: missing {body_missing[:5]}, unexpected {unexpected[:5]}")
        return missing

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        summary_index: Tensor | None = None,
        choice_mask: Tensor | None = None,
        lm_labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        sequence_ids: Tensor | None = None,
        cls_index: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int = 0,
    ) -> FinetuneOutput:
        """Packed rows (``finetune.packing``, classification): ``position_ids``, ``sequence_ids`` and
        ``cu_seqlens`` (R, T) as in pre-training, and ``cls_index`` (N,) each example's flat [CLS] position;
        the logits are then (N, C), one row per example."""
        if cls_index is not None and (self.pooler is None or self.head_kind != "classify"):
            raise ValueError("packed inputs need a classification head on the pooled [CLS] (BERT, summary)")
        shape = input_ids.shape  # (B, T), or (B, K, T) for choices
        flat = lambda t: None if t is None else t.reshape(-1, t.size(-1))  # noqa: E731
        if self.head_kind == "choice":
            input_ids, token_type_ids, attention_mask, lm_labels = map(
                flat, (input_ids, token_type_ids, attention_mask, lm_labels)
            )
            summary_index = None if summary_index is None else summary_index.reshape(-1)
        hidden = self.transformer(
            input_ids, token_type_ids, attention_mask, position_ids, sequence_ids, cu_seqlens, max_seqlen
        )  # (N, T, H)

        if self.head_kind == "span":
            logits = self.head(self.dropout(hidden))  # (B, T, 2)
            if attention_mask is not None:  # padding is never an answer
                logits = logits.masked_fill(~attention_mask.bool()[..., None], torch.finfo(logits.dtype).min)
        else:
            if self.pooling == "mean":
                summary = masked_mean(hidden, attention_mask)  # (N, H)
            elif self.pooler is not None:
                summary = self.pooler(hidden, cls_index)  # (N, H): tanh(dense(h[CLS]))
            else:
                rows = torch.arange(hidden.size(0), device=hidden.device)
                summary = hidden[rows, summary_index]  # (N, H): the extract token's state
            logits = self.head(self.dropout(summary))  # (N, C) or (N, 1)
            if self.head_kind == "choice":
                logits = logits.view(shape[0], shape[1])  # (B, K)
                if choice_mask is not None:
                    logits = logits.masked_fill(~choice_mask.bool(), torch.finfo(logits.dtype).min)

        lm = None
        if lm_labels is not None:  # GPT-1's auxiliary LM loss, through the tied token embedding
            weight = self.transformer.embeddings.word.weight
            # Every position (padding is labelled -100): no need to ask the device which are labelled.
            lm = token_cross_entropy(hidden, lm_labels, weight, None, self.cfg.vocab_size,
                                     max_labels_per_row=lm_labels.size(-1))  # fmt: skip
        return FinetuneOutput(logits=logits, lm=lm)


def masked_mean(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(N, T, H) -> (N, H): the mean over the real tokens (all of them without a mask)."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype)[..., None]  # (N, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def lm_labels_for(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token targets on the fine-tuning inputs: labels[t] = ids[t+1] where t+1 is a real token."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[..., :-1] = torch.where(attention_mask[..., 1:].bool(), input_ids[..., 1:], IGNORE_INDEX)
    return labels


def lr_scales(num_layers: int, body_scale: float, layer_decay: float) -> dict[str, float]:
    """Parameter-name prefix -> lr multiplier: the head at 1, the body at ``body_scale``, decayed per layer from
    the top (layer L-1 and BERT's pooler: body_scale; embeddings: body_scale * decay^L)."""
    L = num_layers
    scales = {"head.": 1.0, "pooler.": body_scale, "transformer.final_norm.": body_scale}
    for i in range(L):
        scales[f"transformer.layers.{i}."] = body_scale * layer_decay ** (L - 1 - i)
    scales["transformer.embeddings."] = body_scale * layer_decay**L
    return scales


def span_loss(logits: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Mean of the start and end cross-entropies over the positions of a window (BERT's SQuAD loss)."""
    start_logits, end_logits = logits.float().unbind(-1)  # (B, T) each
    return (F.cross_entropy(start_logits, start) + F.cross_entropy(end_logits, end)) / 2
