"""What the loop measures, and where it goes.

``StepSums`` keeps a step's sums on the device while its micro-batches run and reads them back once, when
the step ends: one all-reduce of one small vector and one device-to-host copy per optimizer step (nanoGPT's
"CPU-GPU sync point", torchtitan's and litgpt's practice). The task's metric sums (accuracies, per-head
losses) stay on the device for the whole log window and are reduced only at log steps.

``MetricsLog`` turns each step into a record: every step's exact loss goes to ``metrics.jsonl`` (rank 0; a
resumed run first drops the records after its checkpoint's step, so each step appears once);
at log steps the record also carries the task's metrics, throughput, MFU, gradient norm and skip counts, and
goes to MLflow, the console and the progress bar. ``write`` is the one place a record reaches its sinks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.progress import progress_bar

log = logging.getLogger(__name__)

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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank must ask)."""
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step summed over all ranks, and the flags any rank raised."""

    loss: float  # mean micro-batch loss of the step; NaN when any micro-batch's loss was not finite
    nonfinite: bool
    tokens: int
    samples: int
    read_errors: int  # data damage met in the step (loaders' counts)
    samples_substituted: int
    flags: dict[str, bool]


class StepSums:
    """A step's loss, token and sample sums, and a log window's task sums, kept where the work runs.

    ``add`` (per micro-batch) only queues device work: no ``.item()``, no host reads of device tensors.
    ``finish_step`` reduces the step and reads it in one go; ``finish_window`` does the same for the task's
    sums at a log step. Sums are float64: the step loss is the same number whether summed here or on the host.
    """

    # Slots of the per-step vector; flags the ranks must agree on follow them.
    LOSS, NONFINITE, MICRO, TOKENS, SAMPLES, READ_ERRORS, SUBSTITUTED = range(7)
    FLAGS = 7

    def __init__(self, device: torch.device, flag_names: tuple[str, ...]):
        self.device = device
        self.flag_names = flag_names
        self.step = torch.zeros(self.FLAGS + len(flag_names), dtype=torch.float64, device=device)
        self.window: dict[str, torch.Tensor | float] = {}
        self.micro = self.tokens = self.samples = 0  # known on the host: no need to ask the device
        self.read_errors = self.substituted = 0

    def add(self, loss: torch.Tensor, sums: dict[str, torch.Tensor], tokens: int, samples: int,
            data_damage: tuple[int, int] = (0, 0)) -> None:  # fmt: skip
        loss = loss.detach().to(torch.float64)
        self.step.select(0, self.LOSS).add_(loss)
        self.step.select(0, self.NONFINITE).add_(~torch.isfinite(loss))
        for key, value in sums.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)  # stays on the device
            else:
                value = float(value)  # a count the host knew anyway
            if isinstance(self.window.get(key), torch.Tensor):
                self.window[key] += value
            else:
                self.window[key] = value + self.window.get(key, 0.0)
        self.micro += 1
        self.tokens += tokens
        self.samples += samples
        self.read_errors += data_damage[0]
        self.substituted += data_damage[1]

    def finish_step(self, **flags: bool) -> StepTotals:
        """All ranks' sums of the step, and each flag raised on any rank: one collective, one host sync."""
        vec = self.step
        # fill_ takes a host scalar as a kernel argument: no host-to-device copy to wait for.
        vec.select(0, self.MICRO).fill_(self.micro)
        vec.select(0, self.TOKENS).fill_(self.tokens)
        vec.select(0, self.SAMPLES).fill_(self.samples)
        vec.select(0, self.READ_ERRORS).fill_(self.read_errors)
        vec.select(0, self.SUBSTITUTED).fill_(self.substituted)
        for i, name in enumerate(self.flag_names):
            vec.select(0, self.FLAGS + i).fill_(1.0 if flags[name] else 0.0)
        values = all_reduce_sum(vec).tolist()  # the step's one device-to-host read
        vec.zero_()
        self.micro = self.tokens = self.samples = 0
        self.read_errors = self.substituted = 0
        nonfinite = values[self.NONFINITE] > 0
        return StepTotals(
            loss=float("nan") if nonfinite else values[self.LOSS] / max(values[self.MICRO], 1),
            nonfinite=nonfinite,
            tokens=int(values[self.TOKENS]),
            samples=int(values[self.SAMPLES]),
            read_errors=int(values[self.READ_ERRORS]),
            samples_substituted=int(values[self.SUBSTITUTED]),
            flags={name: values[self.FLAGS + i] > 0 for i, name in enumerate(self.flag_names)},
        )

    def finish_window(self) -> dict[str, float]:
        """The task's sums since the last log step, over all ranks (every rank reports the same keys)."""
        keys = sorted(self.window)
        self.window, window = {}, self.window
        if not keys:
            return {}
        vec = torch.stack([torch.as_tensor(window[k], dtype=torch.float64, device=self.device) for k in keys])
        values = all_reduce_sum(vec).tolist()
        return dict(zip(keys, values, strict=True))


class MetricsLog:
    """Records of every step to ``metrics.jsonl`` (rank 0); at log steps also to MLflow, console and bar.

    Every step's record holds its exact loss, lr and epoch (and why its update was skipped, if it was); every
    ``log_every`` steps and at the last it also holds the task's metrics over the window, gradient norm,
    throughput (all ranks together), MFU on a known GPU, skip counts and the fp16 loss scale.
    """

    def __init__(self, out: Path, rank: int, world_size: int, tracker, task, *, log_every: int, max_steps: int,
                 precision: str, initial_step: int):  # fmt: skip
        self.rank, self.world_size = rank, world_size
        self.tracker, self.task = tracker, task
        self.log_every, self.max_steps, self.precision = log_every, max_steps, precision
        self.flops, self.peak = task.flops_per_token(), peak_flops(precision)
        self.path = out / "metrics.jsonl"
        if rank == 0:
            # Steps after the checkpoint this run resumed from were written by an attempt that then died: they
            # are about to be taken again, and each step must appear once.
            dropped = truncate_records(self.path, initial_step)
            if dropped:
                log.info("%s: dropped %d records after step %d (resumed there)", self.path, dropped, initial_step)
        self.file = open(self.path, "a", encoding="utf-8") if rank == 0 else None  # noqa: SIM115
        self.bar = progress_bar(
            total=max_steps, initial=initial_step, desc=task.name, unit="step", disable=rank != 0 or None
        )
        self.window_start = (time.time(), 0, 0)  # time, tokens, samples at the start of the log window

    def start_window(self, tokens: int, samples: int) -> None:
        self.window_start = (time.time(), tokens, samples)

    def log_step(self, state, loss: float, lr: float, skipped: str | None, sums: StepSums, engine, optimizer):
        record = {"step": state.step, "loss": loss, "lr": lr, "epoch": state.epoch}
        if skipped:
            record["update_skipped"] = skipped
        logged = state.step % self.log_every == 0 or state.step >= self.max_steps
        if logged:  # the host reads the window's sums (and DeepSpeed's gradient norm) only here
            t0, tokens0, samples0 = self.window_start
            now = time.time()
            elapsed = max(now - t0, 1e-9)
            self.window_start = (now, state.tokens, state.samples)
            grad_norm = engine.get_global_grad_norm()
            record.update(self.task.metrics(sums.finish_window()))
            record.update(
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                tokens_per_s=(state.tokens - tokens0) / elapsed,  # all ranks together
                tokens_seen=state.tokens,  # real (non-padding) tokens so far: the x axis of packed vs unpacked
                samples_per_s=(state.samples - samples0) / elapsed,
                skipped_nonfinite=state.skipped_nonfinite,
                skipped_overflow=state.skipped_overflow,
                # damaged data met so far, all ranks: counted, and in every record, not only in WARNING lines
                data_read_errors=state.data_read_errors,
                data_samples_substituted=state.data_samples_substituted,
            )
            if self.precision == "fp16":
                record["loss_scale"] = float(getattr(optimizer, "cur_scale", float("nan")))
            if self.peak:
                record["mfu"] = self.flops * record["tokens_per_s"] / (self.peak * self.world_size)
        self.write(record, logged)

    def write(self, record: dict, logged: bool) -> None:
        """The one place a step's record reaches its sinks (``logged``: a log step, also MLflow and console)."""
        if logged:
            self.tracker.log_metrics({k: v for k, v in record.items() if isinstance(v, (int, float))}, record["step"])
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.3g}", refresh=False)
            if self.rank == 0 and (self.bar.disable or not self.bar.fp.isatty()):  # a log file gets lines
                log.info("step %d/%d loss %.4f lr %.3g tokens/s %.3g", record["step"], self.max_steps,
                         record["loss"], record["lr"], record["tokens_per_s"])  # fmt: skip
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None


def truncate_records(path: Path, last_step: int) -> int:
    """Keep only the records of steps up to ``last_step`` in a JSON-lines file (and no torn last line).

    A run resumed from the checkpoint of ``last_step`` writes the later steps again. The file is rewritten
    atomically, so a kill during the rewrite leaves the old one. Returns how many records were dropped.
    """
    if not path.is_file():
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    dropped = 0
    with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
        for line in src:
            try:
                keep = int(json.loads(line)["step"]) <= last_step
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill (or not a record at all)
                keep = False
            if keep:
                dst.write(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
        dst.flush()
        os.fsync(dst.fileno())
    if dropped:
        os.replace(tmp, path)
    else:
        os.unlink(tmp)
    return dropped


def plot_loss_curve(out: Path) -> None:
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
