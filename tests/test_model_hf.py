"""Numerical parity with Hugging Face's BertForPreTraining, OpenAIGPTLMHeadModel and GPT2LMHeadModel (a pre-LN GPT)
(fp32, with padding)."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import ModelConfig, build_model
from pipeline.model.hf_convert import (
    from_hf_config,
    from_hf_model,
    from_hf_state_dict,
    to_hf_config,
    to_hf_model,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
V = 101  # not a multiple of 8: the export must strip the padded rows


def tiny(arch: str = "bert", **kw) -> ModelConfig:
    fields = dict(arch=arch, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128)
    fields.update(max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, fused="none")
    return ModelConfig(**{**fields, **kw})


def batch(B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3 :] = 0  # right padding
    mask[2, T // 2 :] = 0
    segments = (torch.arange(T) >= T // 3).long().expand(B, T).contiguous()
    labels = torch.where(torch.rand(B, T, generator=g) < 0.3, ids, -100)
    labels[mask == 0] = -100
    return ids, mask, segments, labels


def _bert_inputs():
    ids, mask, seg, labels = batch(B=4, T=16, seed=1)
    return ids, mask, seg, labels, torch.tensor([0, 1, 1, 0])


def test_bert_logits_match_hf_both_ways():
    torch.manual_seed(0)
    ours = build_model(tiny()).eval()
    hf = to_hf_model(ours)
    ids, mask, seg, labels, nsp = _bert_inputs()
    with torch.no_grad():
        mine = ours(ids, seg, mask)
        theirs = hf(input_ids=ids, token_type_ids=seg, attention_mask=mask)
    torch.testing.assert_close(mine.mlm_logits, theirs.prediction_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.nsp_logits, theirs.seq_relationship_logits, atol=ATOL, rtol=0)

    # The other way: Hugging Face's own random init, imported.
    torch.manual_seed(1)
    hf = transformers.BertForPreTraining(to_hf_config(tiny())).eval()
    ours = from_hf_model(hf, fused="none").eval()
    with torch.no_grad():
        mine = ours(ids, seg, mask, mlm_labels=labels, nsp_labels=nsp)
        theirs = hf(input_ids=ids, token_type_ids=seg, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(mine.mlm_logits, theirs.prediction_logits[labels != -100], atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.loss, theirs.loss, atol=ATOL, rtol=0)


# GPT-1 (post-LN), and pre-LN GPTs as GPT-2: tanh GELU at GPT-1's width, exact GELU at another width.
GPTS = {
    "gpt1": {},
    "gpt2": {"pre_layernorm": True},
    "gpt2-gelu-wide": {"pre_layernorm": True, "activation": "gelu", "intermediate_size": 96},
}


@pytest.mark.parametrize("variant", GPTS)
def test_gpt_logits_match_hf_both_ways(variant):
    cfg = tiny("gpt", **GPTS[variant])
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    if cfg.pre_layernorm:  # a trained final LayerNorm is not the identity: make sure it is carried over
        with torch.no_grad():
            ours.transformer.final_norm.weight.uniform_(0.5, 1.5)
            ours.transformer.final_norm.bias.normal_(0, 0.1)
    hf = to_hf_model(ours)
    expected = transformers.GPT2LMHeadModel if cfg.pre_layernorm else transformers.OpenAIGPTLMHeadModel
    assert type(hf) is expected
    ids, mask, _, _ = batch(B=4, T=16, seed=2)
    with torch.no_grad():
        for m in (mask, None):
            torch.testing.assert_close(
                ours(ids, m).logits, hf(input_ids=ids, attention_mask=m).logits, atol=ATOL, rtol=0
            )

    torch.manual_seed(1)
    hf = expected(to_hf_config(cfg)).eval()
    ours = from_hf_model(hf, fused="none").eval()
    assert ours.cfg == cfg
    labels = torch.where(mask.bool(), ids, -100)  # HF shifts labels itself; ours are pre-shifted
    shifted = torch.cat([labels[:, 1:], torch.full((4, 1), -100)], 1)
    with torch.no_grad():
        mine = ours(ids, mask, shifted, return_logits=True)
        theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(mine.logits, theirs.logits[shifted != -100], atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.loss, theirs.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt", "gpt2"])
def test_state_dict_round_trip_strips_vocab_padding(arch):
    cfg = tiny("gpt", pre_layernorm=True) if arch == "gpt2" else tiny(arch)
    assert cfg.padded_vocab_size > cfg.vocab_size
    torch.manual_seed(0)
    sd = build_model(cfg).state_dict()
    hf_sd = to_hf_state_dict(cfg, sd)
    word = {"bert": "bert.embeddings.word_embeddings.weight", "gpt": "transformer.tokens_embed.weight"}
    word = word.get(arch, "transformer.wte.weight")
    assert hf_sd[word].shape == (V, 32)  # the hand-off never carries padded rows
    back = from_hf_state_dict(cfg, hf_sd)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("arch", ["bert", "gpt", "gpt2"])
def test_config_round_trip(arch):
    cfg = tiny("gpt", pre_layernorm=True) if arch == "gpt2" else tiny(arch)
    again = from_hf_config(to_hf_config(cfg), fused="none")
    assert again == cfg
    if arch == "gpt2":  # GPT-2's default 50256 would be outside this vocabulary
        assert (to_hf_config(cfg).bos_token_id, to_hf_config(cfg).eos_token_id) == (5, 8)


def test_unconvertible_configs_are_refused():
    with pytest.raises(ValueError, match="pre_layernorm"):
        to_hf_config(tiny(pre_layernorm=True))  # BERT: pre-LN has no Hugging Face class
    with pytest.raises(ValueError, match="intermediate_size"):
        to_hf_config(tiny("gpt", intermediate_size=100))
    with pytest.raises(ValueError, match="activation"):
        to_hf_config(tiny("gpt", activation="gelu"))
