"""The element-wise tails of a transformer block, as plain functions and as their fused (compiled) twins.

A block spends its memory bandwidth on the small ops around each GEMM: bias add + GELU after the first
feed-forward matmul, and bias add + dropout + residual add (+ LayerNorm in post-LN) after each sub-layer's
output projection. In eager PyTorch each op reads and writes the whole activation; inductor fuses each tail
into one kernel, forward and backward, and decides what to save for backward.

The reference path *is* the fused path's source: ``torch.compile`` of the same function. So the two can only
differ by floating-point reassociation, which ``tests/test_model_fused.py`` bounds. LayerNorm always runs in
fp32, whatever the autocast or parameter dtype, because its variance underflows in half precision.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim computed in fp32 (CPU autocast would run it in bf16), returned in x's dtype."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, approximate: str) -> Tensor:
    """gelu(x @ W.T + b): the first feed-forward layer and the MLM head's transform."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def linear_gelu_norm(x: Tensor, weight: Tensor, bias: Tensor, approximate: str, norm_weight, norm_bias, eps):
    """LayerNorm(gelu(x @ W.T + b)): the MLM head's transform, on the (N, H) masked positions only."""
    return layer_norm(F.gelu(F.linear(x, weight, bias), approximate=approximate), norm_weight, norm_bias, eps)


def linear_dropout_add(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor, p: float, training: bool) -> Tensor:
    """residual + dropout(x @ W.T + b): a pre-LN sub-layer's output."""
    return residual + F.dropout(F.linear(x, weight, bias), p, training)


def linear_dropout_add_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float,
    p: float,
    training: bool,
) -> Tensor:
    """LayerNorm(residual + dropout(x @ W.T + b)): a post-LN sub-layer's output (BERT, GPT-1)."""
    return layer_norm(residual + F.dropout(F.linear(x, weight, bias), p, training), norm_weight, norm_bias, eps)


class Kernels(NamedTuple):
    linear_gelu: object
    linear_gelu_norm: object
    linear_dropout_add: object
    linear_dropout_add_norm: object


REFERENCE = Kernels(linear_gelu, linear_gelu_norm, linear_dropout_add, linear_dropout_add_norm)


@functools.cache
def compiled_kernels() -> Kernels:
    """The same functions through inductor; compiled lazily, on first use, once per process and shape family.

    ``dynamic=None`` compiles the first shape statically and switches to a dynamic-shape kernel the first time
    a dimension changes (sequence length across batches, number of masked tokens), so a run recompiles about
    once per function and mode (train / eval). Each call site has its own function, hence its own cache.
    """
    return Kernels(*(torch.compile(fn, dynamic=None) for fn in REFERENCE))


def kernels(mode: str, x: Tensor) -> Kernels:
    """Pick the reference or the compiled kernels for ``mode`` ("none" | "compile" | "auto") and input ``x``."""
    if mode == "none" or torch.compiler.is_compiling():
        # Inside a model that is itself being compiled, inductor already fuses these: don't nest.
        return REFERENCE
    if mode == "compile" or (mode == "auto" and x.is_cuda):
        return compiled_kernels()
    return REFERENCE
