"""Training FLOPs per token, for model FLOPs utilisation (MFU).

Counted from the matmuls, as in PaLM's appendix B and nanoGPT: a multiply-add is 2 FLOPs, and a training
step costs 3x the forward (forward, then backward for activations and for weights). Per token:

* body: ``6 * N_body`` with ``N_body = L * (4*H^2 + 2*H*I)`` the weights of the q/k/v/out and MLP matmuls
  (embedding lookups cost no FLOPs; biases, LayerNorm and softmax are negligible and not counted);
* attention: ``12 * L * T * H`` for QK^T and AV over the full T x T square. Causal kernels skip about half
  of it, but the usual convention (and MFU comparisons with others) counts it whole;
* head: GPT projects every token onto the vocabulary (``6 * H * V``); BERT's MLM head (transform ``H^2``
  plus decoder ``H * V``) runs only at the ``mlm_fraction`` of masked tokens, and the pooler + NSP head
  once per sequence.
"""

from __future__ import annotations

from pipeline.model.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int, mlm_fraction: float = 0.15) -> float:
    """Forward + backward FLOPs per (padded) input token of a ``seq_len`` batch.

    ``mlm_fraction`` is the share of tokens that carry an MLM label (BERT only; 0.15 in the paper). The
    vocabulary counted is the real one, not the padded table: padding is overhead, not useful work.
    """
    H, L, V, ffn = cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.intermediate_size
    body = 6 * L * (4 * H * H + 2 * H * ffn)
    attention = 12 * L * seq_len * H
    if cfg.arch == "gpt":
        head = 6 * H * V
    else:
        mlm = 6 * (H * H + H * V) * mlm_fraction
        pooler_nsp = 6 * (H * H + 2 * H) / seq_len
        head = mlm + pooler_nsp
    return float(body + attention + head)
