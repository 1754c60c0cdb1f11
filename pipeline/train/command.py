"""Pre-train BERT (masked LM + next sentence prediction) or GPT-1 (causal LM) with DeepSpeed ZeRO.

Streams the shards of `python -m pipeline shard` (data.shards), builds the model of the `model` section with
the shards' vocabulary, and trains for train.max_steps optimizer steps, checkpointing every
checkpoint.every_steps steps / checkpoint.every_minutes minutes and at the end. `--resume auto` (the default)
continues from the newest published checkpoint of train.output_dir: model, optimizer, schedule position, loss
scaler, RNG states and data position, into the same MLflow run.

One process:      python -m pipeline train --config configs/pretrain/debug.yaml
Several:          torchrun --nproc-per-node 2 -m pipeline train --config ... (or deepspeed / srun, see launch/)
SIGUSR1/SIGTERM:  checkpoint at the next step boundary, then exit 0 (SLURM pre-emption; see launch/)
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from pipeline.config import add_config_arguments, config_from_args
from pipeline.errors import UserError
from pipeline.train.config import TrainJobConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainJobConfig)


def preflight(cfg: TrainJobConfig, world_size: int, cuda: bool) -> None:
    """Configurations that cannot work fail here, before any weights or processes are spent."""
    from pipeline.train.loop import check_batch_config

    check_batch_config(cfg.train, world_size)
    if cfg.train.precision == "fp16" and not cuda:
        raise UserError("train.precision fp16 needs a CUDA GPU (DeepSpeed's loss scaler); on CPU use bf16 or fp32")
    if cfg.train.precision == "bf16" and cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise UserError("train.precision bf16 is not supported by this GPU; use fp16")


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from pipeline.data.loader import PretrainLoader
    from pipeline.data.shards import check_tokenizer, open_shard_set
    from pipeline.train.engine import init_distributed
    from pipeline.train.loop import run_training
    from pipeline.train.pretrain import PretrainTask, model_config_for_shards

    cfg = config_from_args(TrainJobConfig, args)
    preflight(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)), cuda=torch.cuda.is_available())
    # The shards, the model they fit and the tokenizer are checked before any process group exists.
    if not cfg.data.shards:
        raise UserError("data.shards: a shard directory is required (--data.shards DIR)")
    shard_set = open_shard_set(cfg.data.shards, cfg.data.verify_shards, cfg.data.on_bad_shard)
    model_cfg = model_config_for_shards(cfg.model, shard_set)
    cfg.model = model_cfg  # the resolved config (saved with every checkpoint) names the real vocabulary
    tokenizer = check_tokenizer(shard_set, cfg.tokenizer) if cfg.tokenizer else None
    info = init_distributed()
    try:
        loader = PretrainLoader(
            cfg.data, micro_batch_size=cfg.train.micro_batch_size, rank=info.rank, world_size=info.world_size,
            seed=cfg.train.seed, tokenizer=tokenizer, shard_set=shard_set,
        )  # fmt: skip
        task = PretrainTask(model_cfg, loader, shard_set, info.device, nsp_weight=cfg.objective.nsp_weight)
        result = run_training(
            task, info, train=cfg.train, optim=cfg.optim, schedule=cfg.schedule, checkpoint=cfg.checkpoint,
            tracking=cfg.tracking, deepspeed_json=cfg.deepspeed.config, full_config=cfg,
            extra_tags={"data_fingerprint": shard_set.fingerprint()},
        )  # fmt: skip
        if info.rank == 0:
            print(json.dumps({k: result[k] for k in ("step", "epoch", "samples", "tokens", "skipped_nonfinite",
                                                     "skipped_overflow", "data_read_errors",
                                                     "data_samples_substituted", "mlflow_run_id",
                                                     "stopped_by_signal", "checkpoint_dir")}))  # fmt: skip
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return 0
