"""LAMB under DeepSpeed ZeRO-2 on 2 ranks against a per-parameter LAMB in plain torch (tests/test_lamb.py).

Launched with torchrun --nproc-per-node 2. Parameters of very different scales make per-parameter trust ratios
differ, so a ratio computed over a flat partition (DeepSpeed's behaviour) gives visibly different weights.
Rank 0 prints one JSON line: the largest difference to the reference with and without partition layouts.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.distributed as dist

from pipeline.train.engine import initialize, param_groups
from pipeline.train.lamb import Lamb

deepspeed.init_distributed("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
STEPS, MICRO = 3, 4


def make_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 10))
    with torch.no_grad():
        model[0].weight.mul_(30.0)  # scales that differ by orders of magnitude: ratios differ per parameter
        model[2].weight.mul_(0.05)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(MICRO * world, 24, generator=g), torch.randn(MICRO * world, 10, generator=g)) for _ in range(STEPS)
    ]


def loss_fn(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def reference():
    model = make_model()
    opt = Lamb(param_groups(model, 0.01), lr=0.05)
    for x, y in batches():
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def zero2(with_layout: bool):
    model = make_model()
    opt = Lamb(param_groups(model, 0.01), lr=0.05)
    config = {
        "train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "bf16": {"enabled": False}, "fp16": {"enabled": False}, "gradient_clipping": 0.0,
    }  # fmt: skip
    engine, ds_opt = initialize(model, opt, config)
    if not with_layout:
        opt.layouts.clear()  # DeepSpeed's own behaviour: one ratio per flat partition
    assert ds_opt.optimizer is opt
    for x, y in batches():
        part = slice(rank * MICRO, (rank + 1) * MICRO)
        engine.backward(loss_fn(engine, x[part], y[part]))
        engine.step()
    return [p.detach() for p in engine.module.parameters()]


ref = reference()
diffs = {}
for mode in (True, False):
    got = zero2(mode)
    diffs["with_layout" if mode else "without_layout"] = max(
        float((a - b).abs().max()) for a, b in zip(got, ref, strict=True)
    )
if rank == 0:
    print(json.dumps(diffs), flush=True)
dist.destroy_process_group()
# Native threads of the gloo stack sometimes abort the interpreter's shutdown ("terminate called without an
# active exception", SIGABRT) after all the work is done; leave without running static destructors.
os._exit(0)
