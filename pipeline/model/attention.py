"""Attention over packed rows: several sequences per row, none attending across another's boundary.

A packed batch (``pipeline/data/packing.py``) says which sequence each token belongs to with ``sequence_ids``
(B, T): 1, 2, ... for the sequences of a row, 0 for its padding. Two ways to compute attention on it:

* a boolean mask ``sequence_ids[i] == sequence_ids[j]`` (block-diagonal) through
  ``scaled_dot_product_attention``: exact everywhere (CPU, any dtype, attention dropout), but the kernel still
  computes the masked blocks. Padding positions attend to each other only, so no row is fully masked (that
  would give NaN) and real tokens never see them;
* PyTorch's variable-length flash attention (``torch.nn.attention.varlen``, CUDA, fp16/bf16, no attention
  dropout) over the flattened tokens cut at ``cu_seqlens``: no FLOPs on cross-sequence blocks or padding.

The second needs the cumulative lengths and the longest sequence, which the loader computes on the host so
that the step never waits for the device to find them. Where it cannot run (no such module in this torch, a
CPU tensor, fp32, attention dropout in training) the mask path runs; on a GPU that is worth a warning, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

try:  # torch >= 2.9 (flash attention's varlen entry point)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

_warned: set[str] = set()


@dataclass
class PackedLayout:
    """Where the sequences of a packed batch lie: what ``SelfAttention`` needs instead of a padding mask."""

    mask: Tensor  # (B, 1, T, T) bool, True = attend: same sequence (padding: with padding only)
    cu_seqlens: Tensor | None = None  # (N + 1,) int32: starts of the N runs of the flattened rows (varlen)
    max_seqlen: int = 0  # the longest run, known on the host

    @classmethod
    def from_sequence_ids(
        cls, sequence_ids: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0
    ) -> PackedLayout:
        mask = sequence_ids[:, None, :, None] == sequence_ids[:, None, None, :]  # (B, 1, T, T)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(torch.int32)
        return cls(mask, cu_seqlens, max_seqlen)


def _varlen_unusable(q: Tensor, layout: PackedLayout, dropout_p: float) -> str | None:
    """Why the variable-length kernel cannot compute this call (None: it can)."""
    if varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if layout.cu_seqlens is None:
        return "the batch carries no cu_seqlens"
    if dropout_p > 0:
        return "attention dropout is on (the varlen kernel has none): set model.attention_dropout 0"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it needs fp16/bf16, got {q.dtype}"
    return None


def packed_attention(q: Tensor, k: Tensor, v: Tensor, layout: PackedLayout, dropout_p: float) -> Tensor:
    """Attention of (B, nh, T, hs) q, k, v within each packed sequence; returns (B, nh, T, hs)."""
    if q.is_cuda:
        reason = _varlen_unusable(q, layout, dropout_p)
        if reason is None:
            B, nh, T, hs = q.shape
            flat = lambda t: t.transpose(1, 2).reshape(B * T, nh, hs)  # noqa: E731  (B*T, nh, hs)
            cu, n = layout.cu_seqlens, layout.max_seqlen
            out = varlen_attn(flat(q), flat(k), flat(v), cu, cu, n, n)  # (B*T, nh, hs)
            return out.view(B, T, nh, hs).transpose(1, 2)
        if reason not in _warned:
            _warned.add(reason)
            log.warning("packed attention on the GPU falls back to SDPA with a boolean mask: %s", reason)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, dropout_p=dropout_p)
