"""The training loop shared by pre-training and fine-tuning.

Read top to bottom: resume or start, then for each optimizer step: for each micro-batch, forward and backward
through DeepSpeed; the step; then account, log, evaluate, save, stop. Nothing in the micro-batch loop reads a
device value on the host: the step's sums stay on the device and are read once per step (``StepSums``).
What differs between pre-training and fine-tuning lives in a ``Task`` (model, batches, per-batch loss,
evaluation); what is saved and restored in ``pipeline.train.state``; when to save, evaluate and stop in
``pipeline.train.policy``; what is measured and where it is written in ``pipeline.train.metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from pipeline.config import save_config
from pipeline.errors import UserError
from pipeline.model.loss import IGNORE_INDEX
from pipeline.train.checkpoint import consolidate_checkpoint, find_checkpoint, read_mark
from pipeline.train.config import CheckpointConfig, OptimConfig, ScheduleConfig, TrackingConfig, TrainConfig
from pipeline.train.engine import DistInfo, build_optimizer, deepspeed_config, initialize, param_groups
from pipeline.train.metrics import MetricsLog, StepSums, any_rank, plot_loss_curve
from pipeline.train.policy import EvalSchedule, SaveSchedule, SkippedSteps, StopFlags
from pipeline.train.schedule import lr_multiplier
from pipeline.train.state import RunCheckpoints, TrainState
from pipeline.train.tracking import start_tracking

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One micro-batch's loss and the sums behind its metrics (summed over steps, then divided at log time)."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. {"mlm_loss": ..., "mlm_correct": ...}
    tokens: int = 0  # real (non-padding) tokens of this micro-batch, counted on the host (throughput, MFU)
    samples: int | None = None  # sequences of this micro-batch when they are not its rows (packed batches)
    # Damage the loader met since the previous micro-batch (this rank): read errors, samples substituted.
    data_damage: tuple[int, int] = (0, 0)


# Batches come from the loaders on the CPU. What the step needs to know about a batch's shape (real tokens,
# padding, labelled positions) is read there, as the numpy arrays they are, in microseconds; asking the GPU
# copy would stall the host until the device caught up, once per micro-batch.


def host_padding(attention_mask: torch.Tensor) -> tuple[int, bool]:
    """(real tokens, whether any position is padding) of a batch's mask, read from its host copy."""
    mask = attention_mask.numpy()  # raises for a device tensor: this is for the host copy only
    tokens = int(mask.sum())
    return tokens, tokens != mask.size


def host_max_labels(labels: torch.Tensor) -> int:
    """The most labelled positions (labels != -100) of any row, read from the host copy of the labels."""
    return int((labels.numpy() != IGNORE_INDEX).sum(-1).max(initial=0))


class Task(Protocol):
    """What one kind of training supplies to the loop."""

    name: str
    batches_per_epoch: int  # per rank

    def build_model(self) -> nn.Module: ...

    def lr_scale(self) -> dict[str, float] | None: ...

    def data_layout(self) -> dict: ...  # what a data position refers to (ranks, workers, micro-batch, seed...)

    def batches(self, epoch: int, start_batch: int, history: list[dict]) -> Iterator[dict]: ...

    def forward(self, model: nn.Module, batch: dict) -> StepOutput: ...

    def metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def flops_per_token(self) -> float: ...

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float] | None: ...

    def describe(self) -> dict: ...

    # Files of the run whose content must agree with a checkpoint (fine-tuning's best dev score): copied into
    # each checkpoint before it is published, under the given names, so that a resumed run can take them back.
    def checkpoint_files(self) -> dict[str, Path]: ...


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class EpochBatches:
    """The task's batches, epoch after epoch, with the data position kept in ``state``.

    ``state.batch_in_epoch`` counts the micro-batches this rank consumed in ``state.epoch`` (on this layout;
    ``state.epoch_history`` lists what earlier layouts of the epoch consumed, after a resume on another one);
    a position at an epoch's end moves on to the next epoch when the next batch is asked for.
    """

    def __init__(self, task: Task, state: TrainState):
        self.task, self.state = task, state
        self._batches: Iterator[dict] | None = None

    def next(self) -> dict:
        state = self.state
        while True:
            if self._batches is None:
                self._batches = iter(self.task.batches(state.epoch, state.batch_in_epoch, state.epoch_history))
            batch = next(self._batches, None)
            if batch is not None:
                state.batch_in_epoch += 1
                return batch
            if state.batch_in_epoch == 0 and not state.epoch_history:
                raise RuntimeError(f"{self.task.name}: epoch {state.epoch} has no batches")
            state.epoch, state.batch_in_epoch, state.epoch_history = state.epoch + 1, 0, []
            self._batches = None

    def close(self) -> None:
        """End the current epoch's iteration now, and with it the data loader's workers.

        They ignore the stop signals, so they end only when their iteration does; left to the garbage collector
        (an exception's traceback holds it), that may be after the interpreter has begun to exit, where nothing
        can stop them any more and the exit waits for them.
        """
        if self._batches is not None:
            close = getattr(self._batches, "close", None)  # a generator; a plain iterator has nothing to end
            if close is not None:
                close()
            self._batches = None


def build_engine(task: Task, dist_info: DistInfo, train: TrainConfig, optim: OptimConfig, deepspeed_json: str,
                 universal: bool, init_from: Path | None = None):  # fmt: skip
    """The task's model wrapped by DeepSpeed with our optimizer: ``(engine, DeepSpeed's optimizer)``.

    ``init_from`` (BERT phase 2): a published checkpoint whose fp32 master weights the model starts from, with
    a fresh optimizer and schedule. They are loaded into the module before DeepSpeed sees it, and DeepSpeed's
    masters start from them, not from their bf16/fp16 copy (``initialize``).
    """
    torch.manual_seed(train.seed)
    model = task.build_model()
    if init_from is not None:
        weights = consolidate_checkpoint(init_from, read_mark(init_from).get("zero_stage", 0), model)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise UserError(f"train.init_from {init_from}: weights do not fit this model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")  # fmt: skip
        log.info("initialised weights from %s (fp32 masters; fresh optimizer and schedule)", init_from)
    groups = param_groups(model, optim.weight_decay, task.lr_scale(), optim.layer_adaptation)
    optimizer = build_optimizer(groups, optim, train, dist_info.device)
    ds_config = deepspeed_config(deepspeed_json, train, dist_info.world_size, load_universal=universal)
    return initialize(model, optimizer, ds_config)


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
    stop: StopFlags | None = None,
) -> dict:
    """Train ``task`` for ``train.max_steps`` optimizer steps (resuming a published checkpoint if there is one).

    ``stop``: the stop-signal handlers, installed by the command when it started (else installed here). A stop
    requested before the first step ends the run at once: nothing new to save, the MLflow run untouched.
    """
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    out = Path(train.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(full_config, out / "config.yaml")
    checkpoints = RunCheckpoints(out, checkpoint, train, rank, world, full_config)
    resume = checkpoints.resume_point()  # before the engine: a new world size loads a universal checkpoint
    universal = resume is not None and resume.universal
    init_from = find_checkpoint(train.init_from, Path(train.init_from)) if train.init_from and not resume else None
    engine, optimizer = build_engine(task, dist_info, train, optim, deepspeed_json, universal, init_from)
    state = checkpoints.restore(engine, resume, task.data_layout()) if resume is not None else TrainState()
    own_stop = stop is None
    stop = StopFlags().install() if own_stop else stop
    # A signal during start-up (imports, process group, engine, restore): the ranks agree on it here, before
    # anything is logged. The next chance to agree is the first step's reduction, a step and a save later.
    if any_rank(stop.requested, device):
        if own_stop:
            stop.uninstall()
        log.warning("stop requested (%s) before the first step: exiting without a new checkpoint",
                    stop.signal_name or "signal")  # fmt: skip
        return {"stopped_by_signal": True, **asdict(state), "checkpoint_dir": str(checkpoints.dir)}
    tags = {"world_size": str(world), "task": task.name, "precision": train.precision,
            "zero_stage": str(train.zero_stage), **(extra_tags or {})}  # fmt: skip
    tracker = start_tracking(tracking, out, rank, state.mlflow_run_id, first_step=state.step == 0, tags=tags,
                             full_config=full_config,
                             artifacts=[out / "config.yaml", *task.describe().get("artifacts", [])])  # fmt: skip
    if tracker.enabled:
        state.mlflow_run_id = tracker.run_id

    saves = SaveSchedule(checkpoint, train.max_steps)
    evals = EvalSchedule(eval_every, eval_metric, eval_higher_is_better, train.max_steps)
    skips = SkippedSteps(train.max_nonfinite_steps)
    sums = StepSums(device, flag_names=("save_by_time", "stop"))
    metrics = MetricsLog(out, rank, world, tracker, task, log_every=train.log_every, max_steps=train.max_steps,
                         precision=train.precision, initial_step=state.step)  # fmt: skip
    metrics.start_window(state.tokens, state.samples)
    batches = EpochBatches(task, state)
    accumulation = engine.gradient_accumulation_steps()
    stopped_by_signal, status = False, "FAILED"
    try:
        while state.step < train.max_steps:
            lr = optim.lr * lr_multiplier(state.step, schedule, train.max_steps)
            set_lr(optimizer, lr)
            # ---- one optimizer step: forward and backward per micro-batch; nothing in here waits for the device
            for _ in range(accumulation):
                batch = batches.next()
                output = task.forward(engine, batch)
                engine.backward(output.loss)
                engine.step()  # DeepSpeed updates the weights after the last micro-batch of the step
                samples = output.samples if output.samples is not None else len(next(iter(batch.values())))
                sums.add(output.loss, output.sums, output.tokens, samples, output.data_damage)
            state.step += 1
            step = sums.finish_step(save_by_time=saves.due_by_time(), stop=stop.requested)  # the step's one sync

            # ---- then account, log, evaluate, save, stop
            applied = engine.was_step_applied() and not getattr(optimizer, "last_skipped", False)
            skipped = skips.update(state, step.nonfinite, applied)  # raises after too many NaN steps in a row
            state.tokens += step.tokens
            state.samples += step.samples
            state.data_read_errors += step.read_errors
            state.data_samples_substituted += step.samples_substituted
            metrics.log_step(state, step.loss, lr, skipped, sums, engine, optimizer)
            improved = evals.run(task, engine, state, tracker)
            if saves.due(state.step, step.flags["save_by_time"], improved, step.flags["stop"]):
                checkpoints.save(engine, state, task.data_layout(), stop.signal_name, improved, tracker,
                                 run_files=task.checkpoint_files())  # fmt: skip
                saves.saved()
            if step.flags["stop"]:
                log.warning("stop requested (%s): checkpoint written at step %d", stop.signal_name or "signal",
                            state.step)  # fmt: skip
                stopped_by_signal = True
                break
        status = "FINISHED"
    finally:
        batches.close()  # the loader's workers end now, on every way out of the loop
        if own_stop:
            stop.uninstall()
        metrics.close()
        if rank == 0 and status == "FINISHED" and train.loss_curve:
            plot_loss_curve(out)
            tracker.log_artifact(out / "loss_curve.png")
        if rank == 0:
            tracker.log_artifact(out / "metrics.jsonl")
        # A pre-empted run stays RUNNING in MLflow: the requeued job continues it.
        tracker.end("RUNNING" if stopped_by_signal else status)
    return {"stopped_by_signal": stopped_by_signal, **asdict(state), "checkpoint_dir": str(checkpoints.dir)}


def check_batch_config(train: TrainConfig, world: int) -> int:
    """Gradient accumulation steps, or a clear error when the batch sizes cannot work."""
    per_step = train.micro_batch_size * world
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size {train.global_batch_size} is not divisible by micro_batch_size "
            f"{train.micro_batch_size} x {world} ranks = {per_step}"
        )
    return train.global_batch_size // per_step
