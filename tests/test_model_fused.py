"""Fused (torch.compile / inductor) paths against their plain reference, forward and backward.

Compiling on a 2-core CPU takes tens of seconds the first time in a process; every test here uses tiny
shapes and the same few functions, so the whole file compiles each kernel about once.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.model import ModelConfig, build_model, fused

if not hasattr(torch, "compile"):
    pytest.skip("torch.compile unavailable", allow_module_level=True)

ATOL, RTOL = 1e-5, 1e-4


def _inputs(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def _check(fn_name, tensors, call):
    """``call(kernel, *tensors)`` through the reference and the compiled kernel: same outputs, same gradients."""
    ref_tensors = [t.detach().clone().requires_grad_() for t in tensors]
    ref = call(getattr(fused.REFERENCE, fn_name), *ref_tensors)
    out = call(getattr(fused.compiled_kernels(), fn_name), *tensors)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    for t, r in zip(tensors, ref_tensors, strict=True):
        torch.testing.assert_close(t.grad, r.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_fused_equals_reference(approximate):
    _check(
        "linear_gelu",
        _inputs((2, 5, 16), (24, 16), (24,)),
        lambda fn, x, w, b: fn(x, w, b, approximate),
    )


def test_linear_gelu_norm_fused_equals_reference():
    _check(
        "linear_gelu_norm",
        _inputs((7, 16), (16, 16), (16,), (16,), (16,)),
        lambda fn, x, w, b, nw, nb: fn(x, w, b, "none", nw, nb, 1e-12),
    )


def test_linear_dropout_add_norm_fused_equals_reference():
    _check(
        "linear_dropout_add_norm",
        _inputs((2, 5, 24), (16, 24), (16,), (2, 5, 16), (16,), (16,)),
        lambda fn, x, w, b, res, nw, nb: fn(x, w, b, res, nw, nb, 1e-12, 0.0, True),
    )


def test_linear_dropout_add_fused_equals_reference():
    _check(
        "linear_dropout_add",
        _inputs((2, 5, 24), (16, 24), (16,), (2, 5, 16)),
        lambda fn, x, w, b, res: fn(x, w, b, res, 0.0, True),
    )


def test_fused_dropout_keeps_its_statistics():
    x = torch.ones(64, 256)
    w = torch.eye(256)
    out = fused.compiled_kernels().linear_dropout_add(x, w, torch.zeros(256), torch.zeros(64, 256), 0.25, True)
    kept = out != 0
    assert 0.7 < kept.float().mean().item() < 0.8
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))


def test_auto_mode_uses_reference_on_cpu():
    x = torch.zeros(1)
    assert fused.kernels("auto", x) is fused.REFERENCE
    assert fused.kernels("none", x) is fused.REFERENCE
    assert fused.kernels("compile", x) is fused.compiled_kernels()


@pytest.mark.parametrize(
    ("arch", "pre_layernorm", "checkpointing"),
    [("bert", False, False), ("bert", True, False), ("gpt", False, False), ("gpt", True, True)],
    ids=["bert-post_ln", "bert-pre_ln", "gpt-post_ln", "gpt-pre_ln-checkpointed"],
)
def test_fused_model_equals_reference_model(arch, pre_layernorm, checkpointing):
    def cfg(mode):
        return ModelConfig(
            arch=arch,
            vocab_size=50,
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            intermediate_size=24,
            max_position_embeddings=16,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            pre_layernorm=pre_layernorm,
            activation_checkpointing=checkpointing,
            fused=mode,
        )

    torch.manual_seed(0)
    ref = build_model(cfg("none"))
    fast = build_model(cfg("compile"))
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(9, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.where(mask.bool(), torch.roll(ids, -1, 1), -100)
    outs = []
    for model in (ref, fast):
        out = model(ids, None, mask, labels, torch.tensor([0, 1])) if arch == "bert" else model(ids, mask, labels)
        out.loss.backward()
        outs.append(out.loss.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=RTOL)
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters(), strict=True):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, atol=ATOL, rtol=RTOL, msg=name)
