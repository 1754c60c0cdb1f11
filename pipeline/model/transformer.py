"""The transformer body shared by BERT and GPT-1: embeddings, then a stack of attention + MLP blocks.

BERT and GPT-1 blocks are the same post-LN block (``x = LN(x + sublayer(x))``); they differ in the mask
(bidirectional vs causal), the embeddings (BERT adds segment embeddings and a LayerNorm) and the GELU
flavour. ``pre_layernorm`` switches both to ``x = x + sublayer(LN(x))`` with a final LayerNorm.

Parameters are laid out as ``nn.Linear``/``nn.LayerNorm`` modules so that state dicts read naturally and
convert to Hugging Face one-to-one (``hf_convert.py``); the forward passes call the functional kernels of
``fused.py`` on those parameters so the bias, dropout, residual and LayerNorm around each GEMM can fuse.
(For DeepSpeed ZeRO-3, which gathers a module's parameters when *that* module runs, the wrapper must mark
``Block`` as a leaf module and register the tied embedding as an external parameter of the model.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.model import fused
from pipeline.model.attention import PackedLayout, packed_attention
from pipeline.model.config import ModelConfig

_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


class Embeddings(nn.Module):
    """Token + learned position (+ segment) embeddings; BERT normalises the sum, GPT-1 does not."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        # BERT's post-LN stack starts from a normalised sum; in pre-LN the first block normalises its input.
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if self._has_norm(cfg) else None
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    @staticmethod
    def _has_norm(cfg: ModelConfig) -> bool:
        return cfg.arch == "bert" and not cfg.pre_layernorm

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        seq_len, max_len = input_ids.size(1), self.cfg.max_position_embeddings
        if seq_len > max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings {max_len}")
        # Packed rows hold several sequences, each counting its positions from 0 (position_ids (B, T)).
        positions = self.position.weight[:seq_len] if position_ids is None else self.position(position_ids)
        x = self.word(input_ids) + positions  # (B, T, H)
        if self.token_type is not None:
            # No segment ids means every token is segment 0: add that row instead of looking up zeros.
            x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        if self.norm is not None:
            x = fused.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)
        return self.dropout(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (flash / memory-efficient on GPU).

    The output projection's bias is left to the caller, which fuses it with dropout, residual and LayerNorm.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout_p = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # one GEMM for q, k and v
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, mask: Tensor | PackedLayout | None, is_causal: bool) -> Tensor:
        B, T, H = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, H // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(mask, PackedLayout):  # several sequences per row
            y = packed_attention(q, k, v, mask, dropout_p)  # (B, nh, T, hs)
            return y.transpose(1, 2).reshape(B, T, H)
        # A boolean mask (True = attend) rather than an additive one: no -inf/finfo.min arithmetic to overflow
        # in fp16, and the kernels skip masked blocks.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
        )  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, H)  # (B, T, H), before the output projection


class Block(nn.Module):
    """Attention and MLP sub-layers with residuals, post-LN (the papers) or pre-LN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.approximate = _GELU_APPROXIMATE[cfg.activation]
        self.attn = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        k = fused.kernels(self.cfg.fused, x)
        p, train = self.cfg.hidden_dropout, self.training
        out, fc, proj, n1, n2 = self.attn.proj, self.fc, self.proj, self.norm1, self.norm2
        if self.cfg.pre_layernorm:  # x = x + sublayer(LN(x))
            a = self.attn(fused.layer_norm(x, n1.weight, n1.bias, n1.eps), mask, is_causal)  # (B, T, H)
            x = k.linear_dropout_add(a, out.weight, out.bias, x, p, train)
            h = fused.layer_norm(x, n2.weight, n2.bias, n2.eps)
            h = k.linear_gelu(h, fc.weight, fc.bias, self.approximate)  # (B, T, I)
            return k.linear_dropout_add(h, proj.weight, proj.bias, x, p, train)
        # Post-LN, as in both papers: x = LN(x + sublayer(x)).
        a = self.attn(x, mask, is_causal)  # (B, T, H)
        x = k.linear_dropout_add_norm(a, out.weight, out.bias, x, n1.weight, n1.bias, n1.eps, p, train)
        h = k.linear_gelu(x, fc.weight, fc.bias, self.approximate)  # (B, T, I)
        return k.linear_dropout_add_norm(h, proj.weight, proj.bias, x, n2.weight, n2.bias, n2.eps, p, train)


class TransformerBody(nn.Module):
    """Embeddings and blocks: ``(input_ids, token_type_ids, attention_mask) -> hidden (B, T, H)``.

    This is what fine-tuning heads build on. ``attention_mask`` is (B, T) with 1 for real tokens and 0 for
    padding; padded keys are never attended to (padded queries still produce, meaningless, outputs). Pass
    None for a batch without padding: a mask of all ones gives the same outputs through a slower kernel.

    Packed rows (several sequences per row, ``pipeline/data/packing.py``) give ``sequence_ids`` (B, T) instead:
    1, 2, ... per sequence of a row, 0 on padding; attention then stays within each sequence, and
    ``position_ids`` (B, T) restart at each sequence. ``cu_seqlens`` and ``max_seqlen`` (from the loader's host
    copy) let a GPU run the variable-length kernel (``attention.py``). BERT only: a causal model is not packed.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.causal = cfg.arch == "gpt"
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_layernorm else None

    def attention_mask(self, attention_mask: Tensor | None, T: int) -> tuple[Tensor | None, bool]:
        """The SDPA mask (True = attend) and is_causal flag for a (B, T) padding mask."""
        # Whether a batch has padding is the caller's to say (None: nothing is padded), from the batch's host
        # copy: asking the device here would stall the host once per micro-batch, and break a compiled graph.
        # Without a mask tensor SDPA can pick its fastest kernel (flash).
        if attention_mask is None:
            return None, self.causal
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and queries
        if not self.causal:
            return keys, False
        causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
        return keys & causal, False  # (B, 1, T, T)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        sequence_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int = 0,
    ) -> Tensor:
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        if sequence_ids is not None:
            if self.causal:
                raise ValueError("packed sequences (sequence_ids) are for BERT; a causal model is not packed")
            mask, is_causal = PackedLayout.from_sequence_ids(sequence_ids, cu_seqlens, max_seqlen), False
        else:
            mask, is_causal = self.attention_mask(attention_mask, input_ids.size(1))
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:
                x = checkpoint(block, x, mask, is_causal, use_reentrant=False)
            else:
                x = block(x, mask, is_causal)
        if self.final_norm is not None:
            x = fused.layer_norm(x, self.final_norm.weight, self.final_norm.bias, self.final_norm.eps)
        return x


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: weights ~ N(0, std), biases 0, LayerNorm weight 1 (apply with ``model.apply``)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, std)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
