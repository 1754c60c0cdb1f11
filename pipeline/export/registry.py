"""The MLflow Model Registry: register a hand-off directory as a new model version, and fetch one back.

Registering logs the directory as an MLflow model of the run that produced it (MLflow's transformers flavour
when it can log a checkpoint directory as it is, else a logged model whose artifacts are the directory's files;
the files are uploaded once either way) and creates a version of the registered model, tagged with the
lineage, optionally with an alias. Fetching resolves ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or
``runs:/RUN_ID/PATH`` in the registry (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``), downloads it and
records where it came from in ``registry.json`` beside the files, so every later stage's lineage names the
registered model and version.

Every failure a user can cause (unknown model, version or alias, an unreachable store, a model that is not
one of ours) is a one-line ``UserError``; a failed download leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pipeline.train.tracking  # noqa: F401 - sets MLflow's HTTP timeout and retries before mlflow is imported
from pipeline.config import option
from pipeline.errors import UserError

log = logging.getLogger(__name__)

FORMAT_TAG = "pipeline.format"  # on every version we register: what the files are
ORIGIN_FILE = "registry.json"  # beside fetched files: where they came from (the lineage of what starts from them)
FINETUNED_FORMAT = "pipeline-finetuned/1"  # a fine-tuned model's manifest (pipeline.finetune.handoff)
MODEL_NAME = "model"  # the logged model's name within its run
# MLflow's alias rules: letters, digits, '_' and '-'; not "latest"; not v<digits> (read as a version).
_ALIAS = re.compile(r"^[A-Za-z0-9_\-]+$")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


@dataclass
class RegistryConfig:
    """Registering the result in the MLflow Model Registry (the tracking store of the run, or --tracking-uri)."""

    name: str = option(
        "", "register it as a new version of this registered model (created if new)", aliases=("--register",)
    )
    alias: str = option("", "point this alias of the registered model (champion, staging, ...) at the new version",
                        aliases=("--alias",))  # fmt: skip
    flavor: Literal["auto", "transformers", "files"] = option(
        "auto",
        "how the model is logged: transformers = MLflow's transformers flavour (mlflow.transformers.load_model "
        "gives a pipeline; needs transformers that MLflow's flavour supports), files = a logged model whose "
        "artifacts are the directory's files, auto = transformers when it works here, else files",
    )

    def __post_init__(self) -> None:
        if self.alias and not self.name:
            raise ValueError("registry.alias: an alias needs a registered model (--register NAME)")
        if self.alias and (not _ALIAS.match(self.alias) or self.alias == "latest" or re.match(r"^v\d+$", self.alias)):
            raise ValueError(f"registry.alias: {self.alias!r} is not a valid MLflow alias (letters, digits, _ and -; "
                             "not 'latest' nor v<number>)")  # fmt: skip
        if self.name and ("/" in self.name or "@" in self.name or ":" in self.name):
            raise ValueError(f"registry.name: {self.name!r} may not contain '/', '@' or ':'")


def registry_uri(tracking_uri: str) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``: where MLflow users expect the registry to be."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise UserError("a models:/ or runs:/ URI needs the registry's tracking store: pass --tracking-uri URI or "
                        "set MLFLOW_TRACKING_URI")  # fmt: skip
    return uri


def connect(uri: str, create: bool = False):
    """An MlflowClient on ``uri`` that has answered once; a sqlite file must exist unless ``create``."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not create:
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():  # MLflow would create an empty store there and report every model missing
            raise UserError(f"no MLflow store at {uri} ({path} does not exist)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.search_registered_models(max_results=1)
    except Exception as exc:
        raise UserError(f"cannot reach the MLflow registry at {uri} ({_first_line(exc)})") from None
    return client


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


# ---------------------------------------------------------------------------------------------------------
# Registering


def transformers_flavour_problem(task: str) -> str | None:
    """Why MLflow's transformers flavour cannot log a checkpoint directory here (None: it can). It needs the
    pipeline class of ``task``, which transformers 5 only names (a string) where MLflow 3.17 expects the class."""
    try:
        from transformers import pipelines
    except ImportError:
        return "transformers is not installed"
    import mlflow
    import transformers

    impl = pipelines.check_task(task)[1].get("impl")
    if not isinstance(impl, type):
        return (f"MLflow {mlflow.__version__}'s transformers flavour cannot log a transformers "
                f"{transformers.__version__} checkpoint directory")  # fmt: skip
    return None


def _run_for(client, run_id: str | None, experiment: str, run_name: str, source_uri: str):
    """The run the model is logged to: ``run_id`` when this store has it, else a new run recording where the
    training run lives (a store other than the training's: a server, say)."""
    if run_id:
        try:
            return client.get_run(run_id)
        except Exception as exc:
            if not _missing(exc):
                raise UserError(f"MLflow run {run_id}: {_first_line(exc)}") from None
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    tags = {"pipeline.source_run_id": run_id or "", "pipeline.source_tracking_uri": source_uri}
    run = client.create_run(exp_id, run_name=run_name, tags={k: v for k, v in tags.items() if v})
    client.set_terminated(run.info.run_id)
    log.info("run %s is not in this store; the model is logged to a new run %s", run_id, run.info.run_id)
    return client.get_run(run.info.run_id)


def register(
    directory: Path,
    cfg: RegistryConfig,
    tracking_uri: str,
    run_id: str | None,
    experiment: str,
    tags: dict[str, str],
    description: str,
    task: str,
    step: int = 0,
    source_uri: str = "",
) -> dict:
    """Log ``directory`` as a model of ``run_id`` and register it as a new version of ``cfg.name``."""
    from mlflow.exceptions import MlflowException

    client = connect(tracking_uri, create=True)
    try:
        return _log_and_register(client, directory, cfg, tracking_uri, run_id, experiment, tags, description, task,
                                 step, source_uri)  # fmt: skip
    except MlflowException as exc:  # a name the registry refuses, a store that stopped answering, ...
        raise UserError(f"registering {cfg.name} in {tracking_uri} failed ({_first_line(exc)})") from None


def _log_and_register(client, directory: Path, cfg: RegistryConfig, tracking_uri: str, run_id: str | None,
                      experiment: str, tags: dict[str, str], description: str, task: str, step: int,
                      source_uri: str) -> dict:  # fmt: skip
    import mlflow
    from mlflow.entities import LoggedModelOutput

    # The registry resolves a version's models:/<model_id> source through the process-wide tracking URI.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    run = _run_for(client, run_id, experiment, f"register-{cfg.name}", source_uri)
    run_id = run.info.run_id
    problem = transformers_flavour_problem(task) if cfg.flavor != "files" else "files asked for"
    if cfg.flavor == "transformers" and problem:
        raise UserError(f"registry.flavor transformers: {problem}; use --registry.flavor files")
    model_tags = {k: str(v) for k, v in tags.items()}
    if problem is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the flavour looks for a Hub card and licence: never online
        import mlflow.transformers

        mlflow.set_experiment(experiment_id=run.info.experiment_id)
        requirements = ["transformers", "torch", "safetensors"]
        info = mlflow.transformers.log_model(str(directory), name=MODEL_NAME, task=task, run_id=run_id, step=step,
                                             tags=model_tags, pip_requirements=requirements)  # fmt: skip
        model_id, flavour = info.model_id, "transformers"
    else:
        if cfg.flavor == "auto":
            log.info("logging the model as files (%s)", problem)
        model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                           tags=model_tags, model_type=tags.get(FORMAT_TAG))  # fmt: skip
        try:
            client.log_model_artifacts(model.model_id, str(directory))
        except Exception as exc:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise UserError(f"uploading {directory} to the MLflow store failed ({_first_line(exc)})") from None
        client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        model_id, flavour = model.model_id, "files"
    try:
        client.get_registered_model(cfg.name)
    except Exception as exc:
        if not _missing(exc):
            raise
        client.create_registered_model(cfg.name, description=description.split("\n", 1)[0])
    version = client.create_model_version(cfg.name, f"models:/{model_id}", run_id=run_id, tags=model_tags,
                                          description=description, model_id=model_id)  # fmt: skip
    if cfg.alias:
        client.set_registered_model_alias(cfg.name, cfg.alias, version.version)
    uri = f"models:/{cfg.name}/{version.version}"
    log.info("registered %s as %s (%s, run %s)", directory, uri, flavour, run_id)
    return {"name": cfg.name, "version": int(version.version), "alias": cfg.alias or None, "uri": uri,
            "model_id": model_id, "run_id": run_id, "flavor": flavour, "tracking_uri": tracking_uri}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Fetching


def is_uri(spec: str) -> bool:
    return spec.startswith(("models:/", "runs:/"))


def resolve(client, uri: str, store: str) -> dict:
    """What a models:/ or runs:/ URI points at: name, version, alias, run id, tags (without downloading)."""
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].partition("/")
        if not run_id:
            raise UserError(f"{uri}: expected runs:/RUN_ID/PATH")
        try:
            client.get_run(run_id)
        except Exception as exc:
            raise UserError(f"{uri}: no run {run_id} in {store} ({_first_line(exc)})") from None
        return {"uri": uri, "run_id": run_id, "path": path, "tags": {}}
    match = _MODELS_URI.match(uri)
    if not match:
        raise UserError(f"{uri}: expected models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH")
    name, version, alias = match["name"], match["version"], match["alias"]
    try:
        registered = client.get_registered_model(name)
    except Exception as exc:
        if _missing(exc):
            names = [m.name for m in client.search_registered_models(max_results=20)]
            raise UserError(f"{uri}: no registered model {name!r} in {store} (registered: "
                            f"{', '.join(names) or 'none'})") from None  # fmt: skip
        raise UserError(f"{uri}: {_first_line(exc)}") from None
    if alias:
        if alias not in registered.aliases:
            known = ", ".join(f"{a} -> {v}" for a, v in sorted(registered.aliases.items())) or "none"
            raise UserError(f"{uri}: registered model {name!r} has no alias {alias!r} (aliases: {known})")
        version = str(registered.aliases[alias])
    if not version.isdigit():
        raise UserError(f"{uri}: the version must be a number (or use models:/{name}@ALIAS)")
    try:
        mv = client.get_model_version(name, version)
    except Exception as exc:
        if _missing(exc):
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            raise UserError(f"{uri}: registered model {name!r} has no version {version} (versions: "
                            f"{', '.join(map(str, versions)) or 'none'})") from None  # fmt: skip
        raise UserError(f"{uri}: {_first_line(exc)}") from None
    if FORMAT_TAG not in mv.tags:
        raise UserError(f"{uri}: version {version} of {name!r} was not registered by this pipeline (no "
                        f"{FORMAT_TAG} tag; its source is {mv.source})")  # fmt: skip
    return {"uri": uri, "name": name, "version": int(version), "alias": alias, "run_id": mv.run_id,
            "model_id": getattr(mv, "model_id", None), "source": mv.source, "tags": dict(mv.tags)}  # fmt: skip


def find_files(root: Path, marker: str) -> Path | None:
    """Where the hand-off files are in a download: its root, ``model/`` (the transformers flavour), or the one
    directory a runs:/ download of a directory creates."""
    entries = list(root.iterdir()) if root.is_dir() else []
    tops = [root, *([entries[0]] if len(entries) == 1 and entries[0].is_dir() else [])]
    for candidate in [d for top in tops for d in (top, top / "model")]:
        if (candidate / marker).is_file():
            return candidate
    return None


def fetch(uri: str, tracking_uri: str, dst: Path, marker: str) -> tuple[Path, dict]:
    """Download ``uri`` into ``dst`` (reused when it already holds that version); returns the directory of
    the hand-off files (the one holding ``marker``) and the origin recorded in its ``registry.json``."""
    import mlflow
    import mlflow.artifacts

    uri_store = registry_uri(tracking_uri)
    client = connect(uri_store)
    origin = {**resolve(client, uri, uri_store), "tracking_uri": uri_store}
    origin.pop("tags", None)
    kept = _fetched(dst, marker, origin)
    if kept is not None:
        return kept
    shutil.rmtree(dst, ignore_errors=True)  # another model's files
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = f"models:/{origin['name']}/{origin['version']}" if "name" in origin else uri
    # models:/ URIs are resolved through the process-wide registry and tracking URIs, whatever is passed here
    mlflow.set_registry_uri(uri_store)
    mlflow.set_tracking_uri(uri_store)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri_store)
        found = find_files(tmp, marker)
        if found is None:
            raise UserError(f"{uri}: the downloaded model holds no {marker}; it is not a hand-off of this pipeline")
        (found / ORIGIN_FILE).write_text(json.dumps(origin, indent=1) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, dst)
        except OSError:  # another rank put the same version there first
            if _fetched(dst, marker, origin) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{uri}: download from {uri_store} failed ({_first_line(exc)})") from None
    log.info("fetched %s (%s) into %s", uri, source, dst)
    return find_files(dst, marker), origin


def _fetched(dst: Path, marker: str, origin: dict) -> tuple[Path, dict] | None:
    """The files already in ``dst`` when they are the ones ``origin`` names."""
    found = find_files(dst, marker) if dst.is_dir() else None
    if found is None or not (found / ORIGIN_FILE).is_file():
        return None
    kept = json.loads((found / ORIGIN_FILE).read_text(encoding="utf-8"))
    same = ("name", "version", "run_id", "path", "tracking_uri")
    return (found, kept) if all(kept.get(k) == origin.get(k) for k in same) else None
