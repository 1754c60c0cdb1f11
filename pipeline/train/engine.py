"""Everything DeepSpeed: process group, optimizer choice, the engine's JSON config, initialisation.

The model never sees any of this; it is built as a plain ``nn.Module`` and handed to ``deepspeed.initialize``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.train.config import OptimConfig, TrainConfig
from pipeline.train.lamb import Lamb, zero_partition_layouts

log = logging.getLogger(__name__)

NO_DECAY_SUFFIXES = ("bias",)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # init_distributed made the process group (so the command destroys it)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group torchrun/deepspeed/srun set up, or make a one-process group."""
    if "RANK" not in os.environ:  # a plain `python -m pipeline train`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    import deepspeed
    import torch.distributed as dist

    if os.environ["DS_ACCELERATOR"] == "cpu":
        # DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce ("shm comm") when it starts: 40-120 s
        # of g++ whenever the torch extensions cache is cold (another checkout path, a fresh machine), and a
        # start killed during the build leaves a lock that every later start waits on forever. Only DeepSpeed's
        # inference all-reduce uses it; training's collectives go through gloo. Marked unavailable, it is not built.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    owns_group = not dist.is_initialized()  # else: a group of the process that called us (tests, notebooks)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device, owns_group)


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and LayerNorm (all 1-D tensors) get no weight decay, as in BERT and GPT-1."""
    return param.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: dict[str, float] | None = None,
    layer_adaptation: str = "weights",
) -> list[dict]:
    """Decay / no-decay groups, optionally split further by a per-module lr multiplier.

    ``lr_scale`` maps a parameter-name prefix to a multiplier of the peak lr (fine-tuning: a smaller rate for
    the pre-trained body than for the new head); the first matching prefix wins, the default is 1. Each group
    also says whether LAMB adapts it (``layer_adaptation``: ``weights`` = the decayed kind, biases and LayerNorm
    excluded; ``all``; ``none``), whatever its weight decay; AdamW ignores the key.
    """
    if layer_adaptation not in ("weights", "all", "none"):
        raise ValueError(f"layer_adaptation must be weights, all or none, got {layer_adaptation!r}")
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        for prefix, s in (lr_scale or {}).items():
            if name.startswith(prefix):
                scale = s
                break
        no_decay = is_no_decay(name, p)
        key = (scale, no_decay)
        if key not in groups:
            adapt = layer_adaptation == "all" or (layer_adaptation == "weights" and not no_decay)
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
                           "layer_adaptation": adapt}  # fmt: skip
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


class NonFiniteGuard(torch.optim.Optimizer):
    """Skips a step whose gradients hold NaN/inf.

    DeepSpeed's ZeRO and mixed-precision wrappers already do this; plain fp32 at ZeRO stage 0 calls the
    optimizer directly, where one NaN would poison every weight.
    """

    def __init__(self, inner: torch.optim.Optimizer):
        self.inner = inner
        self.skipped = 0
        self.last_skipped = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.inner.param_groups for p in g["params"] if p.grad is not None]
        # One host read for all gradients (what DeepSpeed's own overflow check costs on the other paths).
        finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True
        self.last_skipped = not finite
        if not finite:
            self.skipped += 1
            return None
        return self.inner.step(closure)


def build_optimizer(groups: list[dict], optim: OptimConfig, train: TrainConfig, device: torch.device):
    """The client optimizer handed to DeepSpeed (always ours, so the choice is explicit and testable).

    - LAMB: this project's ``Lamb`` on every path (ZeRO 0-3, fp32/bf16/fp16, CPU/GPU); ``initialize`` gives it
      the layout of ZeRO's flat partitions, so trust ratios stay per parameter.
    - AdamW: ``torch.optim.AdamW``, with torch's fused kernel on a GPU (``optim.fused: auto``; no JIT build),
      or DeepSpeed's FusedAdam (``optim.fused: deepspeed``; a C++/CUDA op JIT-compiled at start-up).
    """
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    cuda = device.type == "cuda"
    if optim.name == "adamw":
        if optim.fused == "deepspeed":
            from deepspeed.ops.adam import FusedAdam

            opt = FusedAdam(groups, adam_w_mode=True, weight_decay=optim.weight_decay, **kwargs)
        else:
            fused = cuda and optim.fused == "auto"
            opt = torch.optim.AdamW(groups, weight_decay=optim.weight_decay, fused=fused or None,
                                    foreach=None if fused else True, **kwargs)  # fmt: skip
    else:
        opt = Lamb(groups, weight_decay=optim.weight_decay, max_trust_ratio=optim.max_trust_ratio, **kwargs)
    if train.zero_stage == 0 and train.precision == "fp32":
        return NonFiniteGuard(opt)
    return opt


def deepspeed_config(path: str, train: TrainConfig, world_size: int, load_universal: bool) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"deepspeed.config: {path} not found (see configs/deepspeed/)")
    cfg = {k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")}
    accumulation = train.global_batch_size // (train.micro_batch_size * world_size)
    cfg["train_batch_size"] = train.global_batch_size
    cfg["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    cfg["gradient_accumulation_steps"] = accumulation
    cfg["gradient_clipping"] = train.grad_clip
    cfg.setdefault("zero_optimization", {})["stage"] = train.zero_stage
    fp16 = cfg.get("fp16", {})
    cfg["fp16"] = {**fp16, "enabled": train.precision == "fp16"}
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": train.precision == "bf16"}
    cfg["zero_allow_untested_optimizer"] = True  # our LAMB / torch AdamW as client optimizers
    cfg.setdefault("steps_per_print", 10**9)
    if load_universal:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    return cfg


def initialize(model: nn.Module, optimizer, ds_config: dict):
    """``deepspeed.initialize`` with our client optimizer; gives LAMB the layout of ZeRO's flat partitions."""
    import deepspeed

    low_precision = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    # DeepSpeed casts the module to bf16/fp16 and builds its fp32 masters from that rounded copy: keep the
    # fp32 weights to start the masters from (phase 2 and fine-tuning start from trained fp32 weights).
    weights = {n: p.detach().clone() for n, p in model.named_parameters()} if low_precision else None
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    inner = getattr(ds_optimizer, "optimizer", None)
    _undo_state_init_step(ds_optimizer, inner)
    if weights is not None:
        set_master_weights(engine, ds_optimizer, weights)
    if isinstance(inner, Lamb):
        if hasattr(ds_optimizer, "round_robin_bit16_groups") or hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):
            for flat, layout in zero_partition_layouts(ds_optimizer):
                inner.set_partition_layout(flat, layout)
        elif hasattr(ds_optimizer, "fp32_groups_flat_partition"):  # DeepSpeed's BF16_Optimizer
            raise UserError(
                "LAMB under DeepSpeed's BF16_Optimizer (bf16, ZeRO 1, fp32 gradient accumulation): its flat "
                "partitions have no per-parameter layout here; use ZeRO stage 2, or bf16 gradient accumulation"
            )
    return engine, ds_optimizer


def _undo_state_init_step(ds_optimizer, inner) -> None:
    """Take back the step DeepSpeed's fp16/bf16 wrappers at ZeRO 0 take at construction.

    ``FP16_Optimizer`` and ``FP16_UnfusedOptimizer`` create the optimizer's state by calling ``step()`` with
    zero gradients. For any optimizer with weight decay that is a real update of the fp32 masters (with LAMB
    a decay-only update scaled by a trust ratio of 1 / weight_decay, clamped: a 0.5% shrink at lr 0.05), and
    it adds one to every bias correction, so the first real step is not the first step. The module's weights
    (from which the masters were copied) are untouched by it: copy them back and forget the state.
    """
    name = type(ds_optimizer).__name__
    if name == "FP16_UnfusedOptimizer":
        pairs = [pair for hps, lps in zip(ds_optimizer.fp32_groups, ds_optimizer.fp16_groups, strict=True)
                 for pair in zip(hps, lps, strict=True)]  # fmt: skip
    elif name == "FP16_Optimizer":
        pairs = list(zip(ds_optimizer.fp32_groups_flat, ds_optimizer.fp16_groups_flat, strict=True))
    else:
        return
    with torch.no_grad():
        for master, weight in pairs:
            master.copy_(weight)
    inner.state.clear()


def set_master_weights(engine, ds_optimizer, weights: dict[str, torch.Tensor]) -> None:
    """Make DeepSpeed's fp32 master weights exactly ``weights`` (parameter name -> fp32 tensor).

    ZeRO 1-3 (and DeepSpeed's BF16_Optimizer) through ``safe_set_full_fp32_param`` (each rank writes its
    partition); ZeRO 0 in bf16/fp16 into the wrapper's fp32 copies. The module's low-precision weights are
    already the rounded ``weights``: DeepSpeed cast them.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    params = dict(engine.module.named_parameters())
    name = type(ds_optimizer).__name__
    with torch.no_grad():
        if name == "FP16_UnfusedOptimizer":
            names = {id(p): n for n, p in params.items()}
            for lps, hps in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups, strict=True):
                for lp, hp in zip(lps, hps, strict=True):
                    hp.copy_(weights[names[id(lp)]])
        elif name == "FP16_Optimizer":  # flat fp32 copies of each group, the group's tensors end to end
            names = {id(p): n for n, p in params.items()}
            for lps, flat in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups_flat, strict=True):
                offset = 0
                for lp in lps:
                    flat.narrow(0, offset, lp.numel()).copy_(weights[names[id(lp)]].flatten())
                    offset += lp.numel()
        else:
            for n, p in params.items():
                if p.requires_grad:
                    safe_set_full_fp32_param(p, weights[n].to(p.device))
