"""BERT for pre-training: the shared transformer body, a [CLS] pooler, the MLM head and the NSP head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model import fused
from pipeline.model.config import ModelConfig
from pipeline.model.loss import IGNORE_INDEX, token_cross_entropy, vocab_logits
from pipeline.model.transformer import _GELU_APPROXIMATE, TransformerBody, init_weights


class Pooler(nn.Module):
    """tanh(dense(h[CLS])): the sequence summary that NSP and sentence-level fine-tuning heads read."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: Tensor, cls_index: Tensor | None = None) -> Tensor:
        """(B, T, H) -> (B, H) from each row's first token; packed rows: (N, H) at the flat indices
        ``cls_index`` (N,) into the B*T positions, one per sequence."""
        cls = hidden[:, 0] if cls_index is None else hidden.flatten(0, 1)[cls_index]
        return torch.tanh(self.dense(cls))


class MLMTransform(nn.Module):
    """dense -> GELU -> LayerNorm, applied before the tied decoder (the decoder's bias lives in the model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.approximate = _GELU_APPROXIMATE[cfg.activation]
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: Tensor) -> Tensor:
        k = fused.kernels(self.cfg.fused, h)
        d, n = self.dense, self.norm
        return k.linear_gelu_norm(h, d.weight, d.bias, self.approximate, n.weight, n.bias, n.eps)


@dataclass
class BertPretrainOutput:
    """Losses are means over predicted tokens / labelled pairs; counts let the trainer log exact accuracies."""

    loss: Tensor | None  # mlm_loss + nsp_loss, whichever labels were given
    mlm_loss: Tensor | None
    nsp_loss: Tensor | None
    mlm_logits: Tensor | None  # (B, T, V) without mlm_labels; (N, V) at the N labelled positions with them
    # (None when the loss is computed in chunks, see ModelConfig.loss_chunk_size)
    nsp_logits: Tensor  # (B, 2), or (N, 2) for N packed pairs: 0 = B follows A, 1 = B is random (HF's convention)
    mlm_correct: Tensor | None = None
    mlm_count: Tensor | None = None
    nsp_correct: Tensor | None = None
    nsp_count: Tensor | None = None


class BertForPretraining(nn.Module):
    """``model(input_ids, token_type_ids, attention_mask, mlm_labels, nsp_labels) -> BertPretrainOutput``.

    ``mlm_labels`` (B, T) holds the original token at masked positions and -100 elsewhere; when given, the
    vocabulary projection runs only at those positions. The decoder is tied to the input embedding.
    ``max_predictions``: the most masked positions of any row, if the caller knows it from the host copy of
    the batch, so that gathering them needs no device-to-host sync (see ``token_cross_entropy``).

    Packed batches (several pairs per row, ``pipeline/data/packing.py``) add ``position_ids`` and
    ``sequence_ids`` (B, T) and ``cls_index`` (N,), the flat position of each pair's [CLS]: NSP is predicted
    from each pair's own [CLS] and averaged over the N pairs (``nsp_labels`` (N,)), attention never crosses
    pairs, and each pair's MLM and NSP losses are those of the same pair unpacked.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "bert":
            raise ValueError(f"model.arch: BertForPretraining needs arch 'bert', got {cfg.arch!r}")
        self.cfg = cfg
        self.transformer = TransformerBody(cfg)
        self.pooler = Pooler(cfg)
        self.mlm_transform = MLMTransform(cfg)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the decoder's output-only bias
        self.nsp_head = nn.Linear(cfg.hidden_size, 2)
        self.apply(lambda m: init_weights(m, cfg.initializer_range))
        with torch.no_grad():  # padded vocabulary rows are never looked up or predicted: keep them inert
            self.transformer.embeddings.word.weight[cfg.vocab_size :].zero_()

    @property
    def decoder_weight(self) -> Tensor:
        return self.transformer.embeddings.word.weight  # (V_padded, H), tied

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        mlm_labels: Tensor | None = None,
        nsp_labels: Tensor | None = None,
        max_predictions: int | None = None,
        position_ids: Tensor | None = None,
        sequence_ids: Tensor | None = None,
        cls_index: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int = 0,
    ) -> BertPretrainOutput:
        hidden = self.transformer(
            input_ids, token_type_ids, attention_mask, position_ids, sequence_ids, cu_seqlens, max_seqlen
        )  # (B, T, H)
        nsp_logits = self.nsp_head(self.pooler(hidden, cls_index))  # (B, 2), packed: (N, 2)
        V = self.cfg.vocab_size

        mlm_loss = mlm_correct = mlm_count = None
        if mlm_labels is None:
            h = self.mlm_transform(hidden.flatten(0, 1))  # (B*T, H)
            mlm_logits = vocab_logits(h, self.decoder_weight, self.mlm_bias, V)
            mlm_logits = mlm_logits.view(*hidden.shape[:2], V)  # (B, T, V)
        else:
            mlm = token_cross_entropy(
                hidden,
                mlm_labels,
                self.decoder_weight,
                self.mlm_bias,
                V,
                chunk_size=self.cfg.loss_chunk_size,
                head=self.mlm_transform,
                max_labels_per_row=max_predictions,
            )
            mlm_loss, mlm_correct, mlm_count, mlm_logits = mlm.loss, mlm.correct, mlm.count, mlm.logits

        nsp_loss = nsp_correct = nsp_count = None
        if nsp_labels is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels, ignore_index=IGNORE_INDEX)
            labelled = nsp_labels != IGNORE_INDEX
            nsp_correct = ((nsp_logits.detach().float().argmax(-1) == nsp_labels) & labelled).sum()
            nsp_count = labelled.sum()

        if mlm_loss is not None and nsp_loss is not None:
            loss = mlm_loss + nsp_loss
        else:
            loss = mlm_loss if mlm_loss is not None else nsp_loss
        return BertPretrainOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
            mlm_logits=mlm_logits,
            nsp_logits=nsp_logits,
            mlm_correct=mlm_correct,
            mlm_count=mlm_count,
            nsp_correct=nsp_correct,
            nsp_count=nsp_count,
        )
