"""LAMB on every DeepSpeed path against one reference (tests/test_lamb.py, tests/scripts/lamb_zero.py, the GPU
tier in tests/test_gpu.py).

For a ZeRO stage 0-3 and a precision (fp32, bf16; fp16 on a GPU), ``through_deepspeed`` trains a small model
for a few steps through ``pipeline.train.engine.initialize`` with this project's LAMB and returns DeepSpeed's
fp32 master weights; ``reference`` is the textbook per-parameter LAMB on fp32 masters, fed the gradients of a
model held in the same precision (averaged over the ranks' slices, as data parallelism does). Parameters of
very different scales make per-parameter trust ratios differ, so a ratio computed over a flat partition
(DeepSpeed's own LAMB, or ours without partition layouts) is far off.
"""

from __future__ import annotations

import torch

from pipeline.train.engine import initialize, param_groups
from pipeline.train.lamb import Lamb

STEPS, MICRO, LR = 3, 4, 0.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 10))
    with torch.no_grad():
        model[0].weight.mul_(30.0)  # scales that differ by orders of magnitude: ratios differ per parameter
        model[2].weight.mul_(0.05)
    return model


def batches(world: int):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(MICRO * world, 24, generator=g), torch.randn(MICRO * world, 10, generator=g)) for _ in range(STEPS)
    ]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def reference(precision: str, world: int, device: torch.device) -> list[torch.Tensor]:
    dtype = DTYPES[precision]
    low = make_model().to(device, dtype)
    masters = make_model().to(device)  # the fp32 weights the model was built with
    opt = Lamb(param_groups(masters, 0.01), lr=LR)
    for x, y in batches(world):
        grads = [torch.zeros_like(p) for p in masters.parameters()]
        for r in range(world):
            part = slice(r * MICRO, (r + 1) * MICRO)
            low.zero_grad()
            loss_fn(low, x[part].to(device, dtype), y[part].to(device)).backward()
            for g, p in zip(grads, low.parameters(), strict=True):
                g += p.grad.float() / world
        for p, g in zip(masters.parameters(), grads, strict=True):
            p.grad = g
        opt.step()
        with torch.no_grad():
            for lp, hp in zip(low.parameters(), masters.parameters(), strict=True):
                lp.copy_(hp)
    return [p.detach() for p in masters.parameters()]


def through_deepspeed(stage: int, precision: str, rank: int, world: int, device: torch.device,
                      with_layout: bool = True) -> list[torch.Tensor]:  # fmt: skip
    from deepspeed.utils import safe_get_full_fp32_param

    model = make_model()
    opt = Lamb(param_groups(model, 0.01), lr=LR)
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter
    config = {
        "train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
        "zero_optimization": zero, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "bf16": {"enabled": precision == "bf16"}, "gradient_clipping": 0.0,
        # Start at a scale that overflows nothing here: every step is applied, as in the reference.
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 8},
    }  # fmt: skip
    engine, ds_opt = initialize(model, opt, config)
    if not with_layout:
        opt.layouts.clear()  # DeepSpeed's own behaviour: one ratio per flat partition
    dtype = DTYPES[precision]
    for x, y in batches(world):
        part = slice(rank * MICRO, (rank + 1) * MICRO)
        engine.backward(loss_fn(engine, x[part].to(device, dtype), y[part].to(device)))
        engine.step()
    params = list(engine.module.parameters())
    if stage == 0 and precision != "fp32":  # DeepSpeed's unfused mixed-precision optimizer: fp32 copies
        masters = {id(lp): hp for lps, hps in zip(ds_opt.fp16_groups, ds_opt.fp32_groups, strict=True)
                   for lp, hp in zip(lps, hps, strict=True)}  # fmt: skip
        return [masters[id(p)].detach().clone() for p in params]
    if stage == 0:
        return [p.detach().clone() for p in params]
    return [safe_get_full_fp32_param(p).detach().clone().view(p.ds_shape if stage == 3 else p.shape) for p in params]


def max_diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def compare_paths(precisions, rank: int, world: int, device: torch.device, stages=range(4)) -> dict[str, float]:
    """{"<stage>-<precision>": largest |master - reference|, ..., "2-fp32-no-layout": the same without layouts}."""
    diffs = {}
    for precision in precisions:
        ref = reference(precision, world, device)
        for stage in stages:
            diffs[f"{stage}-{precision}"] = max_diff(through_deepspeed(stage, precision, rank, world, device), ref)
    no_layout = through_deepspeed(2, "fp32", rank, world, device, with_layout=False)
    diffs["2-fp32-no-layout"] = max_diff(no_layout, reference("fp32", world, device))
    return diffs
