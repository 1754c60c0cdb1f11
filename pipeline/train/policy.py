"""When to evaluate, save and stop: small policies the loop asks once per optimizer step.

Each answers from what the step's reduction already agreed on (``StepTotals.flags``), so deciding costs no
collective of its own: a rank's clock (save by time) and a rank's signal (stop) are raised as flags into the
step's one all-reduce, and every rank then takes the same decision.
"""

from __future__ import annotations

import logging
import signal
import time

from pipeline.signals import STOP_SIGNALS
from pipeline.train.config import CheckpointConfig

log = logging.getLogger(__name__)


class StopFlags:
    """SIGUSR1 (SLURM's pre-emption warning), SIGTERM (time limit, ``scancel``) and SIGINT (Ctrl-C) ask for a
    checkpoint at the next step boundary, then a clean exit.

    The training commands install it first thing, so that a signal during start-up (imports, the process group,
    DeepSpeed, restoring a checkpoint) is remembered rather than fatal. A second Ctrl-C gives up on the
    checkpoint: it raises ``KeyboardInterrupt`` as usual.
    """

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopFlags:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        """The handlers from before ``install`` (a training run inside a longer-lived process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.requested and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
        if not self.requested:
            # No logging here: a handler may run inside a logging call, whose lock is not reentrant.
            self.signal_name = signal.Signals(signum).name
        self.requested = True


class SaveSchedule:
    """A checkpoint every ``every_steps`` steps, after ``every_minutes`` minutes, at the last step, on a new best
    evaluation score and on a stop request."""

    def __init__(self, cfg: CheckpointConfig, max_steps: int):
        self.cfg = cfg
        self.max_steps = max_steps
        self.last_save = time.time()

    def due_by_time(self) -> bool:
        """This rank's clock says so (ranks agree through the step's reduction)."""
        return bool(self.cfg.every_minutes) and time.time() - self.last_save >= 60 * self.cfg.every_minutes

    def due(self, step: int, by_time: bool, improved: bool, stop: bool) -> bool:
        by_steps = bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0
        return by_steps or by_time or improved or stop or step >= self.max_steps

    def saved(self) -> None:
        self.last_save = time.time()


class EvalSchedule:
    """Evaluation every ``every`` steps and at the last (fine-tuning); keeps the best score in the run state."""

    def __init__(self, every: int, metric: str, higher_is_better: bool, max_steps: int):
        self.every, self.metric, self.higher_is_better, self.max_steps = every, metric, higher_is_better, max_steps

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.max_steps)

    def run(self, task, model, state, tracker) -> bool:
        """Evaluate if due; True when the score is a new best (``state.best_metric`` is updated)."""
        if not self.due(state.step):
            return False
        scores = task.evaluate(model, state.step) or {}
        tracker.log_metrics(scores, state.step)
        value = scores.get(self.metric)
        best = state.best_metric
        if value is None or not (best is None or (value > best if self.higher_is_better else value < best)):
            return False
        state.best_metric = value
        return True


class SkippedSteps:
    """Counts the steps whose update was skipped, by cause, into the run state.

    A NaN/inf loss on any rank skips the step (DeepSpeed's wrappers or ``NonFiniteGuard`` leave the weights
    alone) and ``limit`` of those in a row stop the run; an fp16 overflow is skipped by the loss scaler, which
    then halves the scale.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.nonfinite_in_a_row = 0

    def update(self, state, nonfinite: bool, applied: bool) -> str | None:
        """The cause of this step's skip (``nonfinite_loss``, ``overflow``) or None; raises after too many."""
        if not nonfinite:
            self.nonfinite_in_a_row = 0
            if applied:
                return None
            state.skipped_overflow += 1
            return "overflow"
        state.skipped_nonfinite += 1
        self.nonfinite_in_a_row += 1
        log.warning("step %d: non-finite loss, update skipped (%d in a row)", state.step, self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} consecutive steps with a NaN/inf loss (train.max_nonfinite_steps): "
                "lower optim.lr, raise warmup, check the data, or use bf16 instead of fp16"
            )
        return "nonfinite_loss"
