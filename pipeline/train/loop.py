"""The training loop shared by pre-training and fine-tuning.

One loop, read top to bottom: resume or start, then per micro-batch forward/backward through DeepSpeed, and at
each optimizer step: learning rate, metrics, NaN/overflow accounting, checkpoint, evaluation, stop. What
differs between pre-training and fine-tuning lives in a ``Task`` (model, batches, per-batch loss, evaluation).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import save_config, to_dict
from pipeline.errors import UserError
from pipeline.progress import progress_bar
from pipeline.train.checkpoint import Checkpointer, find_checkpoint, read_mark, set_rng_state, to_universal
from pipeline.train.config import CheckpointConfig, OptimConfig, ScheduleConfig, TrackingConfig, TrainConfig
from pipeline.train.engine import DistInfo, build_optimizer, deepspeed_config, initialize, param_groups
from pipeline.train.schedule import lr_multiplier
from pipeline.train.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One micro-batch's loss and the sums behind its metrics (summed over steps, then divided at log time)."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"mlm_loss": ..., "mlm_correct": ...}
    tokens: int = 0  # tokens of this micro-batch (throughput, MFU)


class Task(Protocol):
    """What one kind of training supplies to the loop."""

    name: str
    batches_per_epoch: int  # per rank

    def build_model(self) -> nn.Module: ...

    def lr_scale(self) -> dict[str, float] | None: ...

    def batches(self, epoch: int, start_batch: int) -> Iterator[dict]: ...

    def forward(self, model: nn.Module, batch: dict) -> StepOutput: ...

    def metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def flops_per_token(self) -> float: ...

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float] | None: ...

    def describe(self) -> dict: ...


@dataclass
class TrainState:
    """Everything needed to continue exactly where a run stopped (with the engine's own state)."""

    step: int = 0  # optimizer steps attempted (applied or skipped)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    samples: int = 0  # global samples consumed
    tokens: int = 0  # global tokens consumed
    skipped_nonfinite: int = 0
    skipped_overflow: int = 0
    mlflow_run_id: str | None = None
    best_metric: float | None = None


class StopFlags:
    """SIGUSR1 (SLURM's pre-emption warning) and SIGTERM ask for a checkpoint at the next step, then exit."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12, "L4": 121e12, "A10": 125e12}


def peak_flops(precision: str) -> float | None:
    """Dense bf16/fp16 peak of the local GPU (for MFU); None on CPU or an unknown GPU."""
    if not torch.cuda.is_available() or precision == "fp32":
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def run_training(
    task: Task,
    dist_info: DistInfo,
    *,
    train: TrainConfig,
    optim: OptimConfig,
    schedule: ScheduleConfig,
    checkpoint: CheckpointConfig,
    tracking: TrackingConfig,
    deepspeed_json: str,
    full_config,
    eval_every: int = 0,
    eval_metric: str = "",
    eval_higher_is_better: bool = True,
    extra_tags: dict[str, str] | None = None,
) -> dict:
    rank, world = dist_info.rank, dist_info.world_size
    out = Path(train.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(full_config, out / "config.yaml")
    checkpointer = Checkpointer(out, checkpoint.keep_last, rank, world)
    stop = StopFlags()
    stop.install()

    # ---- resume point (decided before the engine exists: a new world size loads a universal checkpoint)
    resume_dir = find_checkpoint(checkpoint.resume, out)
    mark = read_mark(resume_dir) if resume_dir else None
    universal = bool(mark) and (checkpoint.universal or mark["world_size"] != world)
    load_dir = to_universal(resume_dir, rank) if universal else resume_dir

    # ---- model, optimizer, engine
    torch.manual_seed(train.seed)
    model = task.build_model()
    groups = param_groups(model, optim.weight_decay, task.lr_scale())
    optimizer = build_optimizer(groups, optim, train, dist_info.device)
    ds_config = deepspeed_config(deepspeed_json, train, world, load_universal=universal)
    engine, ds_optimizer = initialize(model, optimizer, ds_config)

    state = TrainState()
    if load_dir is not None:
        _, client = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name)
        state = TrainState(**{k: v for k, v in client["train_state"].items() if k in TrainState.__dataclass_fields__})
        rank_state = checkpointer.load_rank_state(load_dir) if not universal else None
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            state.batch_in_epoch = rank_state["batch_in_epoch"]
        else:
            # Another world size: the same epoch and the same number of samples, in the new partition.
            state.batch_in_epoch = client["train_state"]["epoch_samples"] // (train.micro_batch_size * world)
            torch.manual_seed(train.seed + 1000 * state.step + rank)
        log.info("resumed from %s at step %d (epoch %d)", resume_dir, state.step, state.epoch)
    elif train.init_from:
        init_dir = find_checkpoint(train.init_from, Path(train.init_from))
        engine.load_checkpoint(str(init_dir.parent), tag=init_dir.name, load_module_only=True,
                               load_optimizer_states=False, load_lr_scheduler_states=False)  # fmt: skip
        log.info("initialised weights from %s (fresh optimizer and schedule)", init_dir)

    # ---- tracking (rank 0)
    tracker = Tracker(enabled=tracking.enabled and rank == 0)
    if rank == 0 and tracking.enabled:
        import deepspeed

        uri = tracking.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        tags = {
            "git_commit": _git_commit(),
            "world_size": str(world),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "task": task.name,
            "precision": train.precision,
            "zero_stage": str(train.zero_stage),
            **(extra_tags or {}),
        }
        state.mlflow_run_id = tracker.start(
            uri, tracking.experiment, tracking.run_name or out.name, state.mlflow_run_id, out / "mlartifacts",
            tracking.system_metrics, tags,
        )  # fmt: skip
        if state.step == 0:
            tracker.log_params(to_dict(full_config))
            tracker.log_artifact(out / "config.yaml")
            for path in task.describe().get("artifacts", []):
                tracker.log_artifact(path)

    # ---- the loop
    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
    flops = task.flops_per_token()
    peak = peak_flops(train.precision)
    device = dist_info.device
    step_loss_sum, step_micro, step_tokens, step_samples = 0.0, 0, 0, 0  # this step, this rank
    log_sums: dict[str, float] = {}  # the task's metric sums since the last log line, this rank
    log_start = (time.time(), state.tokens, state.samples)
    last_save_time = time.time()
    consecutive_nonfinite = 0
    nonfinite_in_step = False
    result = {"stopped_by_signal": False}
    bar = progress_bar(
        total=train.max_steps, initial=state.step, desc=task.name, unit="step", disable=rank != 0 or None
    )
    try:
        while state.step < train.max_steps:
            for batch in task.batches(state.epoch, state.batch_in_epoch):
                lr = optim.lr * lr_multiplier(state.step, schedule, train.max_steps)
                for group in ds_optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                output = task.forward(engine, batch)
                loss_value = output.loss.detach().float().item()
                if not math.isfinite(loss_value):
                    nonfinite_in_step = True
                engine.backward(output.loss)
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                state.batch_in_epoch += 1
                step_micro += 1
                step_loss_sum += loss_value if math.isfinite(loss_value) else 0.0
                step_tokens += output.tokens
                step_samples += len(next(iter(batch.values())))
                for key, value in output.sums.items():
                    log_sums[key] = log_sums.get(key, 0.0) + float(value)
                if not boundary:
                    continue

                # ---- one optimizer step done
                state.step += 1
                applied = engine.was_step_applied() and not getattr(optimizer, "last_skipped", False)
                nonfinite = _any_rank(nonfinite_in_step, device)
                nonfinite_in_step = False
                if nonfinite:
                    state.skipped_nonfinite += 1
                    consecutive_nonfinite += 1
                    log.warning(
                        "step %d: non-finite loss, update skipped (%d in a row)", state.step, consecutive_nonfinite
                    )
                    if consecutive_nonfinite >= train.max_nonfinite_steps:
                        raise RuntimeError(
                            f"{consecutive_nonfinite} consecutive steps with a NaN/inf loss "
                            "(train.max_nonfinite_steps): lower optim.lr, raise warmup, check the data, "
                            "or use bf16 instead of fp16"
                        )
                else:
                    consecutive_nonfinite = 0
                    if not applied:
                        state.skipped_overflow += 1
                # Global sums for this step: the exact per-step loss (logs, resume checks) and throughput.
                totals = _all_reduce_sum([step_loss_sum, step_micro, step_tokens, step_samples], device)
                step_loss = totals[0] / max(totals[1], 1) if not nonfinite else float("nan")
                state.tokens += int(totals[2])
                state.samples += int(totals[3])
                step_loss_sum, step_micro, step_tokens, step_samples = 0.0, 0, 0, 0
                now = time.time()
                record = {"step": state.step, "loss": step_loss, "lr": lr, "epoch": state.epoch}
                if nonfinite or not applied:
                    record["update_skipped"] = "nonfinite_loss" if nonfinite else "overflow"
                if state.step % train.log_every == 0 or state.step >= train.max_steps:
                    keys = sorted(log_sums)
                    sums = dict(zip(keys, _all_reduce_sum([log_sums[k] for k in keys], device), strict=True))
                    t0, tokens0, samples0 = log_start
                    elapsed = max(now - t0, 1e-9)
                    grad_norm = engine.get_global_grad_norm()
                    record.update(task.metrics(sums))
                    record.update(
                        grad_norm=float(grad_norm) if grad_norm is not None else None,
                        tokens_per_s=(state.tokens - tokens0) / elapsed,  # all ranks together
                        samples_per_s=(state.samples - samples0) / elapsed,
                        skipped_nonfinite=state.skipped_nonfinite,
                        skipped_overflow=state.skipped_overflow,
                    )
                    if train.precision == "fp16":
                        record["loss_scale"] = float(getattr(ds_optimizer, "cur_scale", float("nan")))
                    if peak:
                        record["mfu"] = flops * record["tokens_per_s"] / (peak * world)
                    tracker.log_metrics({k: v for k, v in record.items() if isinstance(v, (int, float))}, state.step)
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:.3g}", refresh=False)
                    if rank == 0 and (bar.disable or not bar.fp.isatty()):  # a log file gets lines, a terminal a bar
                        log.info("step %d/%d loss %.4f lr %.3g tokens/s %.3g", state.step, train.max_steps,
                                 step_loss, lr, record["tokens_per_s"])  # fmt: skip
                    log_sums = {}
                    log_start = (now, state.tokens, state.samples)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                bar.update(1)

                # ---- evaluation (fine-tuning), checkpoint, stop
                improved = False
                if eval_every and (state.step % eval_every == 0 or state.step == train.max_steps):
                    scores = task.evaluate(engine, state.step) or {}
                    tracker.log_metrics(scores, state.step)
                    value = scores.get(eval_metric)
                    if value is not None and (
                        state.best_metric is None
                        or (value > state.best_metric if eval_higher_is_better else value < state.best_metric)
                    ):
                        state.best_metric = value
                        improved = True
                due_by_steps = checkpoint.every_steps and state.step % checkpoint.every_steps == 0
                due_by_time = checkpoint.every_minutes and now - last_save_time >= 60 * checkpoint.every_minutes
                stop_now = _any_rank(stop.requested, device)
                last = state.step >= train.max_steps
                if _any_rank(bool(due_by_steps or due_by_time or last or improved), device) or stop_now:
                    _save(checkpointer, engine, state, train, tracker, full_config, stop.signal_name, improved)
                    last_save_time = time.time()
                if stop_now:
                    log.warning(
                        "stop requested (%s): checkpoint written at step %d", stop.signal_name or "signal", state.step
                    )
                    result["stopped_by_signal"] = True
                    break
                if last:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
                continue
            break
        status = "FINISHED"
    except BaseException:
        status = "FAILED"
        raise
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if rank == 0 and status == "FINISHED" and train.loss_curve:
            _plot_loss_curve(out)
            tracker.log_artifact(out / "loss_curve.png")
        tracker.log_artifact(out / "metrics.jsonl") if rank == 0 else None
        # A pre-empted run stays RUNNING in MLflow: the requeued job continues it.
        tracker.end("RUNNING" if result["stopped_by_signal"] else status)
    result.update(asdict(state))
    result["checkpoint_dir"] = str(checkpointer.dir)
    return result


def _save(checkpointer, engine, state: TrainState, train: TrainConfig, tracker, full_config, reason, best) -> None:
    client = {
        "train_state": {
            **asdict(state),
            "epoch_samples": state.batch_in_epoch * train.micro_batch_size * checkpointer.world_size,
        },
        "config": to_dict(full_config),
    }
    rank_state = {"batch_in_epoch": state.batch_in_epoch, "epoch": state.epoch}
    mark = {
        "samples": state.samples,
        "tokens": state.tokens,
        "epoch": state.epoch,
        "mlflow_run_id": state.mlflow_run_id,
        "zero_stage": train.zero_stage,
        "precision": train.precision,
        "reason": reason or "schedule",
        "best": best,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tag_dir = checkpointer.save(engine, state.step, client, rank_state, mark)
    if checkpointer.rank == 0:
        save_config(full_config, tag_dir / "config.yaml")
        tracker.set_tags({"last_checkpoint": str(tag_dir)})


def _plot_loss_curve(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    with open(out / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if math.isfinite(rec.get("loss", float("nan"))):
                steps.append(rec["step"])
                losses.append(rec["loss"])
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=120)
    plt.close(fig)


def check_batch_config(train: TrainConfig, world: int) -> int:
    """Gradient accumulation steps, or a clear error when the batch sizes cannot work."""
    per_step = train.micro_batch_size * world
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size {train.global_batch_size} is not divisible by micro_batch_size "
            f"{train.micro_batch_size} x {world} ranks = {per_step}"
        )
    return train.global_batch_size // per_step
