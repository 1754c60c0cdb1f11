"""The models on tiny configs: presets, shapes, masks, losses, mixed precision, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import (
    ModelConfig,
    build_body,
    build_model,
    flops_per_token,
    list_presets,
    load_model_preset,
    sub_state_dict,
)

V = 101  # not a multiple of 8: exercises the padded embedding table


def tiny(arch: str = "bert", **kw) -> ModelConfig:
    fields = dict(
        arch=arch,
        vocab_size=V,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        fused="none",
    )
    return ModelConfig(**{**fields, **kw})


def batch(B: int = 3, T: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 3 :] = 0  # right padding in two rows
    mask[2, T // 2 :] = 0
    segments = (torch.arange(T) >= T // 3).long().expand(B, T).contiguous()
    labels = torch.full((B, T), -100)
    labels[:, 1::4] = ids[:, 1::4]
    labels[mask == 0] = -100
    return ids, mask, segments, labels


# ---------------------------------------------------------------------------------------------------------
# Config and presets


def test_every_preset_parses_and_builds():
    names = list_presets()
    expected = {"bert-tiny", "bert-mini", "bert-small", "bert-medium", "bert-base", "bert-large", "gpt1", "debug"}
    assert expected <= set(names)
    sizes = {"bert-tiny": (2, 128), "bert-mini": (4, 256), "bert-small": (4, 512), "bert-medium": (8, 512)}
    sizes.update({"bert-base": (12, 768), "bert-large": (24, 1024), "gpt1": (12, 768)})
    for name in names:
        cfg = load_model_preset(name)
        if name in sizes:
            assert (cfg.num_layers, cfg.hidden_size) == sizes[name], name
        with torch.device("meta"):  # no memory, no init time: bert-large is 340M parameters
            model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) > 0
    base = load_model_preset("bert-base")
    with torch.device("meta"):
        num_params = sum(p.numel() for p in build_model(base).parameters())
    assert 109e6 < num_params < 111e6  # BERT-base's 110M, with the MLM head
    gpt = load_model_preset("gpt1")
    assert (gpt.arch, gpt.max_position_embeddings, gpt.num_heads, gpt.activation) == ("gpt", 512, 12, "gelu_tanh")


def test_preset_by_path_and_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  arch: gpt\n  hidden_size: 64\n  num_heads: 4\n", encoding="utf-8")
    cfg = load_model_preset(path, {"vocab_size": 1000})
    assert (cfg.arch, cfg.hidden_size, cfg.vocab_size) == ("gpt", 64, 1000)
    assert load_model_preset("debug", {"arch": "gpt"}).layer_norm_eps == 1e-5  # arch defaults follow the arch
    with pytest.raises(ValueError, match="bert-base"):  # lists the known presets
        load_model_preset("no-such-model")
    with pytest.raises(ValueError, match="unknown config key"):
        load_model_preset("debug", {"hidden": 3})


def test_arch_defaults_and_validation():
    bert, gpt = ModelConfig(arch="bert"), ModelConfig(arch="gpt")
    assert (bert.layer_norm_eps, bert.activation, bert.type_vocab_size) == (1e-12, "gelu", 2)
    assert (gpt.layer_norm_eps, gpt.activation, gpt.type_vocab_size) == (1e-5, "gelu_tanh", 0)
    assert ModelConfig(vocab_size=30522).padded_vocab_size == 30528
    assert ModelConfig(vocab_size=30522, pad_vocab_multiple=1).padded_vocab_size == 30522
    bad = {
        "num_heads": dict(hidden_size=100, num_heads=12),
        "type_vocab_size": dict(arch="gpt", type_vocab_size=2),
        "hidden_dropout": dict(hidden_dropout=1.0),
        "vocab_size": dict(vocab_size=0),
        "loss_chunk_size": dict(loss_chunk_size=-1),
    }
    for field, kwargs in bad.items():
        with pytest.raises(ValueError, match=field):
            ModelConfig(**kwargs)


def test_initialisation_as_bert():
    torch.manual_seed(0)
    model = build_model(tiny(hidden_size=256, num_heads=4, intermediate_size=512))
    fc = model.transformer.layers[0].fc
    assert abs(fc.weight.std().item() - 0.02) < 0.001
    assert torch.all(fc.bias == 0) and torch.all(model.mlm_bias == 0)
    norm = model.transformer.layers[0].norm1
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    word = model.transformer.embeddings.word.weight
    assert word.shape[0] == 104 and torch.all(word[V:] == 0)  # padded rows inert


# ---------------------------------------------------------------------------------------------------------
# Shapes and masks


def test_bert_shapes_and_outputs():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    ids, mask, seg, labels = batch()
    out = model(ids, seg, mask)
    assert out.mlm_logits.shape == (3, 12, V) and out.nsp_logits.shape == (3, 2)
    assert out.loss is None and out.mlm_loss is None
    nsp = torch.tensor([0, 1, 1])
    out = model(ids, seg, mask, mlm_labels=labels, nsp_labels=nsp)
    n = int((labels != -100).sum())
    assert out.mlm_logits.shape == (n, V) and int(out.mlm_count) == n
    assert torch.allclose(out.loss, out.mlm_loss + out.nsp_loss)
    assert int(out.nsp_count) == 3
    expected_nsp_correct = (out.nsp_logits.argmax(-1) == nsp).sum()
    assert int(out.nsp_correct) == int(expected_nsp_correct)
    expected_mlm_correct = (out.mlm_logits.argmax(-1) == labels[labels != -100]).sum()
    assert int(out.mlm_correct) == int(expected_mlm_correct)
    only_nsp = model(ids, seg, mask, nsp_labels=nsp)
    assert torch.allclose(only_nsp.loss, only_nsp.nsp_loss)


def test_gpt_shapes_and_outputs():
    torch.manual_seed(0)
    model = build_model(tiny("gpt")).eval()
    ids, mask, _, _ = batch()
    assert model(ids, mask).logits.shape == (3, 12, V)
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)
    out = model(ids, mask, labels)
    assert out.logits is None and out.loss.ndim == 0 and int(out.count) == 33
    out = model(ids, mask, labels, return_logits=True)
    assert out.logits.shape == (33, V)


def test_bert_padding_is_invisible_to_real_tokens():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    ids, mask, seg, _ = batch()
    with torch.no_grad():
        ref = model(ids, seg, mask).mlm_logits
        noisy = ids.clone()
        noisy[mask == 0] = 7  # different content at padded positions
        out = model(noisy, seg, mask).mlm_logits
        # Row 2 alone, cut to its real length: no padding at all.
        real = int(mask[2].sum())
        alone = model(ids[2:, :real], seg[2:, :real], None).mlm_logits
    real_pos = mask.bool()
    torch.testing.assert_close(out[real_pos], ref[real_pos])
    torch.testing.assert_close(alone[0], ref[2, :real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_gpt_has_no_future_leak(with_mask):
    torch.manual_seed(0)
    model = build_model(tiny("gpt")).eval()
    ids, mask, _, _ = batch()
    mask = mask if with_mask else None
    with torch.no_grad():
        ref = model(ids, mask).logits
        for t in (0, 4, 10):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 1) % V
            out = model(changed, mask).logits
            torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], atol=0, rtol=0)
            assert not torch.allclose(out[0, t + 1], ref[0, t + 1])  # the changed position itself does change


def test_sequence_longer_than_positions_is_refused():
    model = build_model(tiny())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# Losses


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_only_mlm_loss_equals_full_mlm_loss():
    torch.manual_seed(0)
    model = build_model(tiny())
    ids, mask, seg, labels = batch()
    full = model(ids, seg, mask).mlm_logits  # (B, T, V)
    full_loss = F.cross_entropy(full.view(-1, V), labels.view(-1), ignore_index=-100)
    full_loss.backward()
    full_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    out = model(ids, seg, mask, mlm_labels=labels)
    out.mlm_loss.backward()
    torch.testing.assert_close(out.mlm_loss, full_loss)
    grads = _grads(model)
    for name, g in full_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_chunked_loss_equals_unchunked(arch):
    torch.manual_seed(0)
    ids, mask, seg, labels = batch()
    if arch == "gpt":
        labels = torch.where(mask.bool(), torch.roll(ids, -1, 1), -100)
    results = []
    for chunk in (0, 5):
        torch.manual_seed(0)
        model = build_model(tiny(arch, loss_chunk_size=chunk))
        out = model(ids, seg, mask, labels) if arch == "bert" else model(ids, mask, labels)
        loss = out.mlm_loss if arch == "bert" else out.loss
        loss.backward()
        correct = out.mlm_correct if arch == "bert" else out.correct
        results.append((loss.detach(), int(correct), _grads(model)))
    (loss0, correct0, grads0), (loss1, correct1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    assert correct1 == correct0
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_no_masked_tokens_gives_zero_loss_not_nan():
    model = build_model(tiny())
    ids, mask, seg, _ = batch()
    out = model(ids, seg, mask, mlm_labels=torch.full_like(ids, -100))
    assert out.mlm_loss.item() == 0.0 and int(out.mlm_count) == 0
    out.mlm_loss.backward()  # still differentiable


def test_gpt_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    model = build_model(tiny("gpt"))
    ids, mask, _, _ = batch()
    labels = torch.where(mask.bool(), torch.roll(ids, -1, 1), -100)
    labels[:, -1] = -100
    logits = model(ids, mask).logits
    expected = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(ids, mask, labels).loss, expected)


def test_activation_checkpointing_gives_same_gradients():
    ids, mask, seg, labels = batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny(activation_checkpointing=ckpt, hidden_dropout=0.1)).train()
        torch.manual_seed(1)  # same dropout masks: checkpoint replays the RNG state on recompute
        model(ids, seg, mask, labels, torch.tensor([0, 1, 0])).loss.backward()
        grads.append(_grads(model))
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Mixed precision


def _autocast_supported(dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except (RuntimeError, AssertionError):
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("pre_layernorm", [False, True], ids=["post_ln", "pre_ln"])
def test_autocast_runs_without_nan(dtype, arch, pre_layernorm):
    if not _autocast_supported(dtype):
        pytest.skip(f"CPU autocast to {dtype} not supported here")
    torch.manual_seed(0)
    model = build_model(tiny(arch, pre_layernorm=pre_layernorm, hidden_dropout=0.1, attention_dropout=0.1)).train()
    ids, mask, seg, labels = batch()
    with torch.autocast("cpu", dtype=dtype):
        if arch == "bert":
            out = model(ids, seg, mask, labels, torch.tensor([0, 1, 0]))
        else:
            out = model(ids, mask, torch.where(mask.bool(), torch.roll(ids, -1, 1), -100))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_large_logits_do_not_overflow_the_loss(dtype):
    if not _autocast_supported(dtype):
        pytest.skip(f"CPU autocast to {dtype} not supported here")
    torch.manual_seed(0)
    model = build_model(tiny())
    with torch.no_grad():  # logits ~1e4: fine in fp16 storage, but their losses summed in fp16 overflow 65504
        model.mlm_transform.norm.weight.fill_(30.0)
        model.transformer.embeddings.word.weight.mul_(1000.0)
    ids, mask, seg, labels = batch()
    with torch.autocast("cpu", dtype=dtype):
        out = model(ids, seg, mask, mlm_labels=labels)
    assert 5000 < out.mlm_logits.abs().max() < 65504
    expected = F.cross_entropy(out.mlm_logits.float(), labels[labels != -100])
    assert torch.isfinite(out.mlm_loss) and out.mlm_loss.dtype == torch.float32
    torch.testing.assert_close(out.mlm_loss, expected)


def test_whole_model_in_bf16_keeps_layernorm_in_fp32():
    torch.manual_seed(0)
    model = build_model(tiny()).to(torch.bfloat16)  # as DeepSpeed's bf16 mode runs it
    ids, mask, seg, labels = batch()
    out = model(ids, seg, mask, labels, torch.tensor([0, 1, 0]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


# ---------------------------------------------------------------------------------------------------------
# Body reuse and FLOPs


def test_body_reuse_for_fine_tuning():
    torch.manual_seed(0)
    model = build_model(tiny()).eval()
    body = build_body(tiny()).eval()
    body.load_state_dict(sub_state_dict(model.state_dict(), "transformer."))
    ids, mask, seg, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(body(ids, seg, mask), model.transformer(ids, seg, mask))
        pooled = model.pooler(body(ids, seg, mask))
    assert pooled.shape == (3, 32) and pooled.abs().max() <= 1.0  # tanh


def test_flops_per_token_by_hand():
    cfg = tiny()  # L=2, H=32, I=64, V=101
    body = 6 * 2 * (4 * 32 * 32 + 2 * 32 * 64)
    attention = 12 * 2 * 16 * 32
    mlm = 6 * (32 * 32 + 32 * 101) * 0.15
    nsp = 6 * (32 * 32 + 2 * 32) / 16
    assert flops_per_token(cfg, 16) == pytest.approx(body + attention + mlm + nsp)
    assert flops_per_token(cfg, 16, mlm_fraction=0.0) < flops_per_token(cfg, 16)
    assert flops_per_token(tiny("gpt"), 16) == pytest.approx(body + attention + 6 * 32 * 101)
    base = load_model_preset("bert-base")  # ~6 * 85M body params + attention at T=128
    assert 5.4e8 < flops_per_token(base, 128) < 6.0e8


def test_dataclass_round_trip():
    cfg = load_model_preset("bert-base")
    assert ModelConfig(**dataclasses.asdict(cfg)) == cfg
