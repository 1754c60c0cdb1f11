"""Configuration of `python -m pipeline train` (and the shared parts of `finetune`).

Each component owns its section: ``model`` (pipeline.model), ``data`` (pipeline.data), ``optim``,
``schedule``, ``train``, ``checkpoint``, ``tracking``, ``deepspeed``. Checks that need more than one section
(batch divisibility, precision on this hardware, tokenizer vs shards) run in ``pipeline.train.preflight``
before any weights exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import option, section
from pipeline.data.config import DataConfig
from pipeline.model.config import ModelConfig


@dataclass
class OptimConfig:
    """Optimizer: LAMB (the large-batch BERT recipe) or AdamW. Biases and LayerNorm never get weight decay."""

    name: Literal["lamb", "adamw"] = option("lamb", "lamb: layer-wise trust ratios for large batches; adamw")
    lr: float = option(1e-3, "peak learning rate (after warmup)")
    betas: list[float] = option([0.9, 0.999], "Adam/LAMB moment coefficients")
    eps: float = option(1e-6, "denominator epsilon")
    weight_decay: float = option(
        0.01, "decoupled weight decay (0 = none; with LAMB the trust ratio stays, see layer_adaptation)"
    )
    layer_adaptation: Literal["weights", "all", "none"] = option(
        "weights",
        "LAMB: which parameters get the trust ratio ||w|| / ||update||, independently of weight decay. weights: "
        "matrices and embeddings, not biases and LayerNorm (Google's and NVIDIA's BERT LAMB); all: every "
        "parameter (the paper's algorithm as written); none: no layer adaptation (Adam with decoupled decay)",
    )
    max_trust_ratio: float = option(10.0, "LAMB: clamp of the per-parameter trust ratio ||w|| / ||update||")
    fused: Literal["auto", "deepspeed", "torch"] = option(
        "auto",
        "AdamW's kernel: auto = torch's fused AdamW on a GPU (no build step), its multi-tensor one on CPU; torch "
        "= the multi-tensor one everywhere; deepspeed = DeepSpeed's FusedAdam (JIT-compiled at start-up). "
        "LAMB is always this project's multi-tensor LAMB (pipeline/train/lamb.py), the same maths on every path",
    )

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("optim.weight_decay must be >= 0 and optim.eps > 0")
        if self.max_trust_ratio <= 0:
            raise ValueError(f"optim.max_trust_ratio must be > 0, got {self.max_trust_ratio}")
        if self.name == "adamw" and self.layer_adaptation != "weights":
            raise ValueError(f"optim.layer_adaptation={self.layer_adaptation} is a LAMB option; optim.name is adamw")
        if self.name == "lamb" and self.fused == "deepspeed":
            raise ValueError(
                "optim.fused=deepspeed with LAMB: DeepSpeed's FusedLamb is another recipe (trust ratio on biases "
                "and LayerNorm, clamped to [0.01, 10], from uncorrected moments); LAMB always runs this project's "
                "implementation, so use optim.fused=auto"
            )


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then decay to min_lr_ratio * lr at the last step."""

    warmup_steps: int = option(-1, "warmup steps; -1 = warmup_ratio * max_steps")
    warmup_ratio: float = option(0.01, "warmup as a share of train.max_steps (when warmup_steps is -1)")
    decay: Literal["poly", "linear", "cosine", "constant"] = option("poly", "decay after warmup")
    power: float = option(0.5, "poly decay power (BERT with LAMB: 0.5; 1.0 is linear)")
    min_lr_ratio: float = option(0.0, "final learning rate as a share of the peak")

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("schedule.warmup_ratio must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("schedule.min_lr_ratio must be in [0, 1]")


@dataclass
class TrainConfig:
    """The training run: batch sizes, length, precision, ZeRO, robustness, output."""

    output_dir: str = option("runs/pretrain", "run directory: checkpoints, MLflow store, logs, plots", path=True)
    global_batch_size: int = option(256, "samples per optimizer step over all ranks (micro x accumulation x ranks)")
    micro_batch_size: int = option(32, "samples per forward/backward on one rank")
    max_steps: int = option(1000, "optimizer steps of this run (the schedule's length)")
    precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "fp16 uses dynamic loss scaling (GPU only); bf16 works on CPU and Ampere+ GPUs"
    )
    zero_stage: int = option(1, "DeepSpeed ZeRO stage 0-3 (overrides the DeepSpeed JSON)")
    grad_clip: float = option(1.0, "clip the global gradient norm (0 = off)")
    seed: int = option(1234, "seed of model init, dropout and the data order")
    log_every: int = option(10, "console and MLflow metrics every N steps")
    max_nonfinite_steps: int = option(
        20, "stop with an error after this many consecutive steps with a NaN/inf loss (each is skipped)"
    )
    init_from: str = option(
        "", "start from this checkpoint's weights with a fresh optimizer and schedule (BERT phase 2)", path=True
    )
    loss_curve: bool = option(True, "write loss_curve.png in the run directory at the end")

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("train.global_batch_size and train.micro_batch_size must be >= 1")
        if self.max_steps < 1:
            raise ValueError("train.max_steps must be >= 1")
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, how many are kept, and resuming."""

    every_steps: int = option(500, "save every N optimizer steps (0 = only by time and at the end)")
    every_minutes: float = option(30.0, "also save when this many minutes passed since the last save (0 = off)")
    keep_last: int = option(3, "published checkpoints to keep (older ones are deleted)")
    resume: str = option(
        "auto",
        "auto: continue from the latest published checkpoint if any; none; or a path",
        path=lambda value: value not in ("auto", "none"),
    )
    universal: bool = option(
        False, "load through DeepSpeed's universal format (set automatically when the world size changed)"
    )

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only). Failures warn and never stop training."""

    enabled: bool = option(True, "log params, metrics and artifacts to MLflow")
    tracking_uri: str = option(
        "",
        "MLflow tracking URI (a server: http://host:5000); empty = a sqlite store in the run directory",
        aliases=("--tracking-uri",),
    )
    experiment: str = option("pretrain", "MLflow experiment name")
    run_name: str = option("", "MLflow run name (default: the run directory's name)")
    system_metrics: bool = option(True, "also log CPU/GPU/memory utilisation")


@dataclass
class DeepSpeedSection:
    """The DeepSpeed JSON the engine starts from; this config's values override its batch/ZeRO/precision keys."""

    config: str = option("configs/deepspeed/zero1.json", "DeepSpeed JSON config file", path=True)


@dataclass
class ObjectiveConfig:
    """How the pre-training losses are combined (BERT: masked LM + next-sentence prediction)."""

    nsp_weight: float = option(
        1.0,
        "BERT: weight of the next-sentence loss in the total, loss = mlm_loss + nsp_weight * nsp_loss (1: the "
        "paper; 0: masked LM only, NSP still measured but its head not trained)",
    )

    def __post_init__(self) -> None:
        if self.nsp_weight < 0:
            raise ValueError(f"objective.nsp_weight must be >= 0, got {self.nsp_weight}")


@dataclass
class TrainJobConfig:
    """`python -m pipeline train`."""

    model: ModelConfig = section(ModelConfig)
    objective: ObjectiveConfig = section(ObjectiveConfig)
    data: DataConfig = section(DataConfig)
    tokenizer: str = option(
        "",
        "the tokenizer you will fine-tune with; checked against the shards' (default: the shards' own)",
        aliases=("--tokenizer",),
        path=True,
    )
    optim: OptimConfig = section(OptimConfig)
    schedule: ScheduleConfig = section(ScheduleConfig)
    train: TrainConfig = section(TrainConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    tracking: TrackingConfig = section(TrackingConfig)
    deepspeed: DeepSpeedSection = section(DeepSpeedSection)
