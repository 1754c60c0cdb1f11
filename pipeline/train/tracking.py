"""MLflow tracking on rank 0: a run that survives restarts, and failures that warn instead of stopping.

Every call goes through ``_safe``: an unreachable server or a full disk logs one warning per kind of call and
the training continues. The run id is stored in every checkpoint, so a resumed job appends to the same run,
and logs only the steps that run does not hold yet (an attempt that died may have logged steps after its last
checkpoint, which the resumed job takes again): each step appears once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

from pipeline.config import flatten, to_dict
from pipeline.preprocess.records import write_json_atomic

log = logging.getLogger(__name__)

STARTED_RUN = "mlflow_run.json"  # tracking URI and id of the MLflow run this output directory's last fresh start opened

# An unreachable server must cost seconds, not the minutes of MLflow's default retry policy.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


class Tracker:
    """A no-op unless ``enabled`` (rank 0 with tracking on)."""

    BACKOFF_S = 60.0  # after a failure, calls are skipped for this long: a hung server costs one timeout a minute

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.run_id: str | None = None
        self._warned: set[str] = set()
        self._mlflow = None
        self._suspended_until = 0.0
        self.failures = 0
        # A continued run: the last step MLflow holds for each metric. Those steps were logged by an attempt
        # that went on past its last checkpoint; the resumed run takes them again but does not log them twice.
        self.logged_through: dict[str, int] = {}

    def _safe(self, what: str, fn, *args, force: bool = False, **kwargs):
        if not self.enabled or self._mlflow is None:
            return None
        if not force and time.monotonic() < self._suspended_until:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            self.failures += 1
            self._suspended_until = time.monotonic() + self.BACKOFF_S
            if what not in self._warned:
                self._warned.add(what)
                log.warning("MLflow %s failed (%s: %s); training continues", what, type(exc).__name__, exc)
            return None

    def start(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None,
        artifact_dir: Path,
        system_metrics: bool,
        tags: dict[str, str] | None = None,
    ) -> str | None:
        if not self.enabled:
            return None
        try:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                location = None if tracking_uri.startswith("http") else artifact_dir.resolve().as_uri()
                exp_id = mlflow.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            run = mlflow.start_run(
                run_id=run_id,
                experiment_id=None if run_id else exp_id,
                run_name=None if run_id else run_name,
                log_system_metrics=system_metrics,
            )
            self._mlflow = mlflow
            self.run_id = run.info.run_id
            if tags:
                self._safe("set_tags", mlflow.set_tags, tags)
            if run_id:
                self.logged_through = self._safe("get_metric_history", self._last_logged_steps) or {}
            log.info("MLflow run %s (%s) at %s", self.run_id, "resumed" if run_id else "new", tracking_uri)
        except Exception as exc:
            log.warning("MLflow unavailable (%s: %s); training continues without tracking", type(exc).__name__, exc)
            self._mlflow = None
        return self.run_id

    def close_abandoned(self, run_id: str) -> None:
        """End ``run_id`` as FAILED if it is still RUNNING: an attempt that died (kill -9, a node lost) before its
        first checkpoint, so that nothing can continue it. Without this it stays RUNNING in the UI for ever."""
        if self._mlflow is None or run_id == self.run_id:
            return

        def close():
            client = self._mlflow.MlflowClient()
            if client.get_run(run_id).info.status != "RUNNING":
                return
            client.set_tag(run_id, "pipeline.superseded_by", self.run_id)
            client.set_terminated(run_id, status="FAILED")
            log.info("MLflow run %s (died before its first checkpoint) marked FAILED; %s starts over", run_id,
                     self.run_id)  # fmt: skip

        self._safe("close_abandoned", close)

    def _last_logged_steps(self) -> dict[str, int]:
        client = self._mlflow.MlflowClient()
        out = {}
        for key in client.get_run(self.run_id).data.metrics:
            if key.startswith("system/"):  # MLflow's own system metrics count their own steps
                continue
            steps = [m.step for m in client.get_metric_history(self.run_id, key)]
            if steps:
                out[key] = max(steps)
        return out

    def log_params(self, config: dict) -> None:
        if self._mlflow is None:
            return
        params = {k: str(v)[:500] for k, v in flatten(config).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self._safe("log_params", self._mlflow.log_params, dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._mlflow is not None:
            clean = {k: float(v) for k, v in metrics.items() if v is not None and step > self.logged_through.get(k, -1)}
            if clean:
                self._safe("log_metrics", self._mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._safe("log_artifact", self._mlflow.log_artifact, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._safe("set_tags", self._mlflow.set_tags, tags)

    def end(self, status: str = "FINISHED") -> None:
        if self._mlflow is not None:
            self._safe("end_run", self._mlflow.end_run, status=status, force=True)  # always try to close the run
            self._mlflow = None


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_tracking(cfg, out: Path, rank: int, run_id: str | None, *, first_step: bool, tags: dict[str, str],
                   full_config, artifacts: list) -> Tracker:  # fmt: skip
    """Rank 0's tracker for a training run: a new MLflow run, or ``run_id`` continued after a restart.

    ``cfg`` is the tracking section. A new run (``first_step``) also gets the resolved config as params and
    the ``artifacts`` (config.yaml, the data manifest, lineage).
    """
    tracker = Tracker(enabled=cfg.enabled and rank == 0)
    if not tracker.enabled:
        return tracker
    import deepspeed
    import torch

    uri = cfg.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    tags = {"git_commit": git_commit(), "torch": torch.__version__, "deepspeed": deepspeed.__version__, **tags}
    tracker.start(uri, cfg.experiment, cfg.run_name or out.name, run_id, out / "mlartifacts", cfg.system_metrics, tags)
    # A checkpoint names the run a restart continues; until the first one exists, this file does, so that a
    # start after a crash before it can close the run that attempt left RUNNING.
    started = out / STARTED_RUN
    if run_id is None and tracker.run_id is not None:
        try:
            previous = json.loads(started.read_text())
        except (OSError, ValueError):  # none yet, or torn by a kill
            previous = {}
        if isinstance(previous, dict) and previous.get("tracking_uri") == uri and previous.get("run_id"):
            tracker.close_abandoned(str(previous["run_id"]))
        write_json_atomic(started, {"tracking_uri": uri, "run_id": tracker.run_id})
    if first_step:
        tracker.log_params(to_dict(full_config))
        for path in artifacts:
            tracker.log_artifact(path)
    return tracker
