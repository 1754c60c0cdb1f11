"""The GPU tier (`pytest -m gpu`): what only a CUDA device can show. Skipped without one (conftest.py).

- fp16 dynamic loss scaling: an overflow injected into one step's gradients skips that step (no weight
  changes), halves the scale, and the next steps train again;
- LAMB on every DeepSpeed path (ZeRO 0-3 x fp32/bf16/fp16, one GPU) equal to the textbook reference, bf16
  ZeRO 1/2/3 included (tests/lamb_paths.py);
- SDPA: an unpadded batch (the trainer passes no mask) runs under flash or memory-efficient attention only;
- ``model.fused: compile`` gives the eager model's loss and gradients;
- the trainer's micro-batches make no host sync (``torch.cuda.set_sync_debug_mode("error")`` around forward
  and backward of a micro-batch that is not the last of its step).

benchmarks/gpu_check.sh runs this tier first on a GPU machine.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


def tiny_bert(**overrides):
    from pipeline.model import build_model, load_model_preset

    torch.manual_seed(0)
    cfg = load_model_preset("bert-tiny", {"vocab_size": 1000, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                                          **overrides})  # fmt: skip
    return cfg, build_model(cfg).to(DEVICE)


def bert_batch(cfg, B=8, T=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, cfg.vocab_size, (B, T), generator=g)
    labels = torch.where(torch.rand(B, T, generator=g) < 0.15, ids, -100)
    return {
        "input_ids": ids.to(DEVICE),
        "token_type_ids": (torch.arange(T) >= T // 2).long().expand(B, T).contiguous().to(DEVICE),
        "mlm_labels": labels.to(DEVICE),
        "nsp_labels": torch.randint(0, 2, (B,), generator=g).to(DEVICE),
        "max_predictions": int((labels != -100).sum(1).max()),
    }


def test_fp16_overflow_skips_the_step_and_halves_the_scale(process_group):
    from pipeline.train.engine import initialize, param_groups
    from pipeline.train.lamb import Lamb

    cfg, model = tiny_bert()
    config = {
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "fp16": {"enabled": True, "initial_scale_power": 12, "hysteresis": 1}, "gradient_clipping": 1.0,
    }  # fmt: skip
    with mock.patch.dict(os.environ, process_group.env):
        engine, ds_opt = initialize(model, Lamb(param_groups(model, 0.01), lr=1e-3), config)
    weight = engine.module.transformer.embeddings.word.weight
    poison = {"on": False}
    weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    trace = []
    for step in range(4):
        poison["on"] = step == 1
        before = weight.detach().clone()
        engine.backward(engine(**bert_batch(cfg, seed=step)).loss)
        scale_before = ds_opt.cur_scale
        engine.step()
        trace.append((engine.was_step_applied(), scale_before, ds_opt.cur_scale, torch.equal(before, weight)))
    applied, _, _, unchanged = zip(*trace, strict=True)
    assert applied == (True, False, True, True), trace
    assert unchanged == (False, True, False, False), trace
    assert trace[1][2] == trace[1][1] / 2, trace  # the scale halved on the overflow


def test_lamb_on_every_path_equals_the_reference_on_one_gpu(process_group):
    from lamb_paths import compare_paths
    from test_lamb import check_paths

    with mock.patch.dict(os.environ, process_group.env):
        diffs = compare_paths(["fp32", "bf16", "fp16"], rank=0, world=1, device=DEVICE)
    assert len(diffs) == 13, diffs
    check_paths(diffs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpadded_batches_run_on_flash_or_memory_efficient_attention(dtype):
    """Without a mask (what the trainer passes for an unpadded batch) attention runs with the math kernel
    forbidden; with a padding mask it would have to fall back (flash takes no mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg, model = tiny_bert()
    batch = bert_batch(cfg)
    with torch.autocast("cuda", dtype=dtype):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            with sdpa_kernel([backend]):
                loss = model(**batch, attention_mask=None).loss
            loss.backward()
            assert torch.isfinite(loss)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError):
            mask = torch.ones_like(batch["input_ids"])
            mask[:, -5:] = 0
            model(**batch, attention_mask=mask)


def test_compiled_kernels_equal_eager():
    cfg, eager = tiny_bert(fused="none")
    _, compiled = tiny_bert(fused="compile")
    compiled.load_state_dict(eager.state_dict())
    batch = bert_batch(cfg)
    losses, grads = [], []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=5e-2, atol=5e-3, msg=name)


def test_no_host_sync_in_a_micro_batch_of_the_trainer(tmp_path, small_tokenizer, process_group):
    """Forward and backward of a micro-batch that is not the last of its step, as the trainer runs them
    (PretrainTask.forward through the DeepSpeed engine), with CUDA's sync debug mode set to error."""
    from train_helpers import build_shards

    from pipeline.config import build_config
    from pipeline.data.loader import PretrainLoader
    from pipeline.data.shards import open_shard_set
    from pipeline.train.config import TrainJobConfig
    from pipeline.train.engine import DistInfo, build_optimizer, deepspeed_config, initialize, param_groups
    from pipeline.train.pretrain import PretrainTask, model_config_for_shards

    shards = build_shards(tmp_path / "bert", small_tokenizer, "bert")
    cfg = build_config(TrainJobConfig, "configs/pretrain/debug.yaml", {
        "data.shards": str(shards), "train.precision": "bf16", "train.micro_batch_size": 8,
        "train.global_batch_size": 32, "data.num_workers": 1})  # fmt: skip
    shard_set = open_shard_set(cfg.data.shards)
    cfg.model = model_config_for_shards(cfg.model, shard_set)
    loader = PretrainLoader(cfg.data, micro_batch_size=8, seed=1, shard_set=shard_set, pin_memory=True)
    task = PretrainTask(cfg.model, loader, shard_set, DEVICE)
    model = task.build_model()
    info = DistInfo(0, 1, 0, DEVICE)
    optimizer = build_optimizer(param_groups(model, 0.01), cfg.optim, cfg.train, info.device)
    with mock.patch.dict(os.environ, process_group.env):
        engine, _ = initialize(model, optimizer, deepspeed_config(cfg.deepspeed.config, cfg.train, 1, False))
    batches = loader.iterate(0)
    for _ in range(2):  # warm-up: allocator, cuBLAS handles, first-call set-up
        engine.backward(task.forward(engine, next(batches)).loss)
        engine.step()
    batch = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = task.forward(engine, batch)
        engine.backward(out.loss)
        assert not engine.is_gradient_accumulation_boundary()
        engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    batches.close()


def test_packed_attention_runs_the_varlen_kernel_and_equals_the_mask_path():
    """bf16 packed rows: the variable-length kernel (no FLOPs on cross-pair blocks) against SDPA with the
    block-diagonal mask, and no fallback warning on the way."""
    import numpy as np

    from pipeline.data.packing import pack_batch
    from pipeline.model import attention

    if attention.varlen_attn is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 100, size=24)
    T = 128
    mask = (np.arange(T) < lengths[:, None]).astype(np.int64)
    packed = pack_batch({"attention_mask": mask}, T, {"attention_mask": 0})
    R = len(packed["attention_mask"])
    seq = torch.from_numpy(packed["sequence_ids"]).to(DEVICE)
    layout = attention.PackedLayout.from_sequence_ids(
        seq, torch.from_numpy(packed["cu_seqlens"]).to(DEVICE), int(np.diff(packed["cu_seqlens"]).max())
    )
    q, k, v = torch.randn(3, R, 4, T, 32, device=DEVICE, dtype=torch.bfloat16).unbind(0)
    attention._warned.clear()
    fast = attention.packed_attention(q, k, v, layout, 0.0)
    assert not attention._warned, attention._warned
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask)
    real = seq.bool()[:, None, :, None].expand_as(fast)  # padding outputs are meaningless either way
    torch.testing.assert_close(fast[real].float(), reference[real].float(), atol=2e-2, rtol=2e-2)
