"""Learning-rate schedules: linear warmup, then polynomial, linear, cosine or constant decay.

BERT's recipe is warmup then polynomial decay (power 1.0 with Adam in the paper; 0.5 with LAMB in the
76-minute BERT work). Phase 2 of BERT starts a fresh schedule from the phase-1 weights (``train.init_from``).
"""

from __future__ import annotations

import math

from pipeline.train.config import ScheduleConfig


def warmup_steps(cfg: ScheduleConfig, max_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else round(cfg.warmup_ratio * max_steps)


def lr_multiplier(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the peak lr for the update that follows ``step`` completed steps."""
    warmup = warmup_steps(cfg, max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = cfg.min_lr_ratio
    if cfg.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.decay == "linear":
        shape = 1.0 - progress
    else:
        shape = (1.0 - progress) ** cfg.power
    return floor + (1.0 - floor) * shape
