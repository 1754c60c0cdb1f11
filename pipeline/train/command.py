"""Pre-train BERT (masked LM + next sentence prediction) or GPT-1 (causal LM) with DeepSpeed ZeRO.

Streams the shards of `python -m pipeline shard` (data.shards), builds the model of the `model` section with
the shards' vocabulary, and trains for train.max_steps optimizer steps, checkpointing every
checkpoint.every_steps steps / checkpoint.every_minutes minutes and at the end. `--resume auto` (the default)
continues from the newest published checkpoint of train.output_dir: model, optimizer, schedule position, loss
scaler, RNG states and data position, into the same MLflow run.

One process:      python -m pipeline train --config configs/pretrain/debug.yaml
Several:          torchrun --nproc-per-node 2 -m pipeline train --config ... (or deepspeed / srun, see launch/)
SIGUSR1/SIGTERM/SIGINT (to the rank or its whole process group, at any moment): checkpoint at the next step
boundary and exit 0, or exit 0 at once before the first step (SLURM pre-emption, time limit, scancel; Ctrl-C
twice gives up on the checkpoint). stdout holds only the final JSON summary; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args
from pipeline.console import library_output_to_stderr
from pipeline.errors import UserError
from pipeline.train.config import TrainJobConfig
from pipeline.train.policy import StopFlags

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


def check_paths(cfg) -> None:
    """The paths a training job needs, checked before DeepSpeed is imported (seconds, not a minute, to an error):
    the DeepSpeed config file, an output directory this process can create and write, the checkpoints named in
    checkpoint.resume and train.init_from. Every rank checks: each writes its part of a checkpoint there."""
    from pipeline.train.checkpoint import find_checkpoint

    if not Path(cfg.deepspeed.config).is_file():
        raise UserError(f"deepspeed.config: {cfg.deepspeed.config} not found (see configs/deepspeed/)")
    out = Path(cfg.train.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"train.output_dir {out}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir {out}: not writable by this user")
    find_checkpoint(cfg.checkpoint.resume, out)  # a resume path that holds no checkpoint: UserError
    if cfg.train.init_from:
        find_checkpoint(cfg.train.init_from, Path(cfg.train.init_from))


def train(cfg: TrainJobConfig, stop: StopFlags) -> dict | None:
    """Run the job; the summary (rank 0) or None (other ranks)."""
    import torch
    import torch.distributed as dist

    from pipeline.data.loader import PretrainLoader
    from pipeline.data.shards import check_tokenizer, open_shard_set
    from pipeline.train.engine import init_distributed
    from pipeline.train.loop import run_training
    from pipeline.train.pretrain import PretrainTask, model_config_for_shards

    # Everything a user can get wrong is checked before any process group exists, and before DeepSpeed is
    # imported: the shards, the batch layout, the model they fit, the tokenizer, the loader, the paths.
    if not cfg.data.shards:
        raise UserError("data.shards: a shard directory is required (--data.shards DIR)")
    shard_set = open_shard_set(cfg.data.shards, cfg.data.verify_shards, cfg.data.on_bad_shard)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    preflight(cfg, world_size=world, cuda=torch.cuda.is_available())
    model_cfg = model_config_for_shards(cfg.model, shard_set)
    cfg.model = model_cfg  # the resolved config (saved with every checkpoint) names the real vocabulary
    tokenizer = check_tokenizer(shard_set, cfg.tokenizer) if cfg.tokenizer else None
    loader = PretrainLoader(
        cfg.data, micro_batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
        seed=cfg.train.seed, tokenizer=tokenizer, shard_set=shard_set,
    )  # fmt: skip
    check_paths(cfg)  # last: it creates the output directory
    info = init_distributed()
    try:
        assert (info.rank, info.world_size) == (rank, world), "the launcher's RANK / WORLD_SIZE changed"
        task = PretrainTask(model_cfg, loader, shard_set, info.device, nsp_weight=cfg.objective.nsp_weight)
        result = run_training(
            task, info, train=cfg.train, optim=cfg.optim, schedule=cfg.schedule, checkpoint=cfg.checkpoint,
            tracking=cfg.tracking, deepspeed_json=cfg.deepspeed.config, full_config=cfg,
            extra_tags={"data_fingerprint": shard_set.fingerprint()}, stop=stop,
        )  # fmt: skip
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()
    if info.rank != 0:
        return None
    keys = ("step", "epoch", "samples", "tokens", "skipped_nonfinite", "skipped_overflow", "data_read_errors",
            "data_samples_substituted", "mlflow_run_id", "stopped_by_signal", "checkpoint_dir")  # fmt: skip
    return {k: result[k] for k in keys}


def run(args: argparse.Namespace) -> int:
    # First of all: SIGTERM / SIGUSR1 / SIGINT from here on ask for a checkpoint and a clean exit.
    stop = StopFlags().install()
    try:
        cfg = config_from_args(TrainJobConfig, args)
        with library_output_to_stderr():
            summary = train(cfg, stop)
    finally:
        stop.uninstall()
    if summary is not None:
        print(json.dumps(summary))
    return 0
