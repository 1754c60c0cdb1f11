"""The hand-off: the model card every export writes, the MLflow Model Registry (register on export, fine-tune
from models:/ URIs, register the fine-tuned model) against the run's own sqlite store, and the one-line errors
of bad registry input. The same against a real `mlflow server`, and `evaluate`: tests/test_handoff_server.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import require_shared_data, run_cli
from finetune_data import movie_tsv, pretrained_run

from pipeline.config import build_config
from pipeline.errors import UserError
from pipeline.export.card import read as read_card
from pipeline.export.registry import FORMAT_TAG
from pipeline.export.source import open_pretrained
from pipeline.finetune.config import FinetuneJobConfig
from pipeline.tokenizer.spm import sha256_file

FAST = ("--train.micro_batch_size", "8", "--train.global_batch_size", "8", "--finetune.epochs", "1",
        "--optim.lr", "1e-3", "--train.loss_curve", "false", "--tracking.system_metrics", "false")  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.getbasetemp() / "ft-pretrained"  # the fine-tuning tests' runs, built once a session
    return {arch: pretrained_run(root, small_tokenizer, arch) for arch in ("bert", "gpt")}


@pytest.fixture(scope="module")
def registered(runs, tmp_path_factory):
    """The BERT run exported and registered in its own sqlite store (new registered model, alias champion)."""
    out = tmp_path_factory.mktemp("handoff") / "bert"
    store = f"sqlite:///{runs['bert'] / 'mlflow.db'}"
    before = run_files(store, runs["bert"])
    proc = run_cli("export", "--checkpoint", str(runs["bert"]), "--output", str(out), "--register", "handoff-bert",
                   "--alias", "champion", "--card.license", "cc-by-4.0")  # fmt: skip
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run_files(store, runs["bert"]) == before  # uploaded as the model's files only, not also to the run
    return out, printed, store, proc.stderr


def run_files(store: str, run: Path) -> set[str]:
    """Every artifact file of the pre-training run ``run`` (other tests may have logged exports to it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    run_id = json.loads((run / "checkpoints" / "step_00000004" / "checkpoint.json").read_text())["mlflow_run_id"]
    files, todo = set(), [None]
    while todo:
        for item in client.list_artifacts(run_id, todo.pop()):
            if item.is_dir:
                todo.append(item.path)
            else:
                files.add(item.path)
    return files


def check_card(out: Path, run: Path, license: str = "other") -> tuple[dict, str]:
    """The card of the export ``out`` of ``run``: its YAML parses (huggingface_hub's ModelCard, a dev dependency
    here, and plain YAML) and it states what the manifest, the data manifest and the run's metrics say."""
    meta, text = read_card(out / "README.md")
    manifest = json.loads((out / "manifest.json").read_text())
    assert meta["library_name"] == "transformers" and meta["license"] == license and meta["language"] == ["en"]
    assert meta["pipeline_tag"] == {"bert": "fill-mask", "gpt": "text-generation"}[manifest["arch"]]
    assert meta["datasets"] == ["corpus-subset"]  # the shards' input file, as the data manifest names it
    front = (out / "README.md").read_text().split("---\n")[1]
    assert yaml.safe_load(front) == meta
    shards = json.loads(Path(manifest["lineage"]["data_manifest"]["path"]).read_text())
    assert f"{shards['stats']['documents']} documents, {shards['totals']['tokens']:,} tokens" in text
    assert f"{manifest['step']} steps" in text and manifest["data_manifest_sha256"] in text
    head = "AutoModelForMaskedLM" if manifest["arch"] == "bert" else "AutoModelForCausalLM"
    assert f'model = {head}.from_pretrained("PATH")' in text and "## Known limits" in text
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"loss {final['loss']:.4g}" in text  # the metrics the run ended on
    assert "README.md" not in manifest["files"]  # evaluate rewrites it
    return meta, text


def test_every_export_writes_a_model_card_whose_yaml_parses(registered, runs):
    out, _, _, _ = registered
    meta, text = check_card(out, runs["bert"], license="cc-by-4.0")  # --card.license
    assert "model-index" not in meta  # no fine-tuning results yet
    assert "models:/handoff-bert@champion" in text  # how to fetch it from the registry


def test_register_on_export_tags_the_version_with_its_lineage(registered, runs):
    out, printed, store, stderr = registered
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    (version,) = client.search_model_versions("name='handoff-bert'")
    manifest = json.loads((out / "manifest.json").read_text())
    assert printed["registered"]["uri"] == "models:/handoff-bert/1" and str(version.version) == "1"
    assert version.run_id == manifest["mlflow_run_id"]  # a model of the pre-training run itself
    assert str(client.get_model_version_by_alias("handoff-bert", "champion").version) == "1"
    tags = version.tags
    assert tags[FORMAT_TAG] == "pipeline-export/1" and tags["architecture"] == "BertForPreTraining"
    assert (tags["step"], tags["tokens"]) == (str(manifest["step"]), str(manifest["tokens"]))
    assert tags["data_manifest_sha256"] == manifest["data_manifest_sha256"]
    assert tags["tokenizer_sha256"] == manifest["tokenizer"]["sha256"] and tags["objective"] == "mlm+nsp"
    assert tags["git_commit"] == manifest["git_commit"]
    # the files went up once, as the model's artifacts (the fixture checked that the run got none)
    model = client.get_logged_model(printed["registered"]["model_id"])
    assert model.source_run_id == manifest["mlflow_run_id"]
    logged = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert set(manifest["files"]) | {"manifest.json", "README.md"} == logged
    assert "models:/handoff-bert/1" in stderr  # how to load it


def test_finetune_from_the_registry_records_the_version_and_registers_its_best_model(registered, tmp_path):
    out_export, _, store, _ = registered
    data = require_shared_data()
    movies = movie_tsv(data, tmp_path / "movies.tsv", 48)
    out = tmp_path / "ft"
    proc = run_cli("finetune", "--config", "configs/finetune/movie-sentiment.yaml", "--checkpoint",
                   "models:/handoff-bert@champion", "--data.train.path", str(movies), "--train.output_dir", str(out),
                   *FAST, "--register", "handoff-bert-movies", env={"MLFLOW_TRACKING_URI": store})  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    lineage = json.loads((out / "lineage.json").read_text())
    origin = lineage["init"]["registered_model"]
    assert (origin["name"], origin["version"], origin["alias"]) == ("handoff-bert", 1, "champion")
    assert origin["tracking_uri"] == store and lineage["pretraining"]["step"] == 4
    # the downloaded export is the registered one, file for file
    fetched = out / "init_model"
    for name, record in json.loads((out_export / "manifest.json").read_text())["files"].items():
        assert sha256_file(fetched / name) == record["sha256"]
    from mlflow.tracking import MlflowClient

    ft_store = f"sqlite:///{out / 'mlflow.db'}"  # the fine-tuning run's own store (no --tracking-uri)
    client = MlflowClient(tracking_uri=ft_store, registry_uri=ft_store)
    tags = client.get_run(report["mlflow_run_id"]).data.tags
    assert (tags["registered_model_name"], tags["registered_model_version"]) == ("handoff-bert", "1")
    assert tags["init_model_uri"] == "models:/handoff-bert@champion"
    # --register: the best checkpoint, consolidated, as a version of the fine-tuned model, its parent in tags
    assert json.loads(proc.stdout.strip().splitlines()[-1])["registered"]["uri"] == "models:/handoff-bert-movies/1"
    version = client.get_model_version("handoff-bert-movies", "1")
    assert version.run_id == report["mlflow_run_id"] and version.tags[FORMAT_TAG] == "pipeline-finetuned/1"
    assert (version.tags["parent_model_name"], version.tags["parent_model_version"]) == ("handoff-bert", "1")
    assert float(version.tags["score"]) == pytest.approx(report["best"]["accuracy"], abs=1e-6)

    import torch

    from pipeline.finetune.handoff import load_finetuned

    model, tokenizer, manifest = load_finetuned(out / "model")
    assert manifest["best"]["step"] == report["best"]["step"] and tokenizer.vocab_size == 2000
    ids = torch.tensor([[2, *tokenizer.encode(["a fine film"])[0], 3]])
    assert model(ids).logits.shape == (1, 2)
    # a fine-tuned model is not a starting point for fine-tuning
    with pytest.raises(UserError, match="is a fine-tuned model"):
        open_pretrained(str(out / "model"))


def _finetune_cfg(checkpoint: str, tmp_path: Path, **extra) -> FinetuneJobConfig:
    values = {"init.checkpoint": checkpoint, "train.output_dir": str(tmp_path / "ft"), **extra}
    return build_config(FinetuneJobConfig, "configs/finetune/movie-sentiment.yaml", values)


def test_bad_registry_input_is_one_line_and_leaves_nothing_behind(registered, tmp_path, monkeypatch):
    from pipeline.finetune.command import finetune

    _, printed, store, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cases = {
        "models:/no-such-model/1": "no registered model 'no-such-model'.*registered: .*handoff-bert",
        "models:/handoff-bert/7": "has no version 7 \\(versions: 1\\)",
        "models:/handoff-bert@staging": "has no alias 'staging' \\(aliases: champion -> 1\\)",
        "models:/handoff-bert": "expected models:/NAME/VERSION",
    }
    for uri, message in cases.items():
        with pytest.raises(UserError, match=message):
            finetune(_finetune_cfg(uri, tmp_path))
    # a version registered by someone else: not one of ours
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.create_registered_model("someone-elses")
    client.create_model_version("someone-elses", "file:///nowhere", run_id=printed["mlflow_run_id"])
    with pytest.raises(UserError, match="was not registered by this pipeline"):
        finetune(_finetune_cfg("models:/someone-elses/1", tmp_path))
    assert not (tmp_path / "ft" / "init_model").exists()
    assert not any(p.name.startswith(".init_model") for p in (tmp_path / "ft").glob(".*"))
    # an unreachable server: found in seconds, one line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="cannot reach the MLflow registry at http://127.0.0.1:9"):
        finetune(_finetune_cfg("models:/handoff-bert/1", tmp_path))
    # no registry named at all
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(UserError, match="pass --tracking-uri URI or set MLFLOW_TRACKING_URI"):
        finetune(_finetune_cfg("models:/handoff-bert/1", tmp_path))
    # a sqlite store that does not exist is not created
    missing = tmp_path / "nothing.db"
    with pytest.raises(UserError, match="no MLflow store at"):
        finetune(_finetune_cfg("models:/handoff-bert/1", tmp_path, **{"tracking.tracking_uri": f"sqlite:///{missing}"}))
    assert not missing.exists()
    # through the command line: one line on stderr, exit status 2
    proc = run_cli("finetune", "--config", "configs/finetune/movie-sentiment.yaml", "--checkpoint",
                   "models:/handoff-bert/7", "--train.output_dir", str(tmp_path / "cli"), check=False,
                   env={"MLFLOW_TRACKING_URI": store})  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: models:/handoff-bert/7")


def test_an_export_missing_a_file_is_named(registered, tmp_path):
    out, _, _, _ = registered
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="the export is missing tokenizer.json"):
        open_pretrained(str(broken))
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match="missing tokenizer.json"):
        open_pretrained(str(broken))
    shutil.copyfile(out / "tokenizer.json", broken / "tokenizer.json")
    with pytest.raises(UserError, match="model.safetensors has 9 bytes"):
        open_pretrained(str(broken))


def test_register_fails_cleanly_when_the_store_is_unreachable(runs, tmp_path):
    out = tmp_path / "export"
    proc = run_cli("export", "--checkpoint", str(runs["gpt"]), "--output", str(out), "--register", "x",
                   "--tracking-uri", "http://127.0.0.1:9", check=False)  # fmt: skip
    assert proc.returncode == 2 and "cannot reach the MLflow registry at http://127.0.0.1:9" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".export*"))  # checked before anything is written
    proc = run_cli("export", "--checkpoint", str(runs["gpt"]), "--output", str(out), "--alias", "champion",
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "an alias needs a registered model" in proc.stderr


def test_evaluation_results_go_into_the_cards_model_index(registered, tmp_path):
    """What `evaluate` does to an export's card, from a result of the shape pipeline.evaluate.transfer gives."""
    from pipeline.evaluate.command import _update_card

    out, _, _, _ = registered
    export = tmp_path / "export"
    shutil.copytree(out, export)
    runs = {
        "pretrained": [{"accuracy": 0.40, "metric": "accuracy"}],
        "random": [{"accuracy": 0.35, "metric": "accuracy"}],
    }
    from pipeline.evaluate.transfer import summarise

    result = {"budget": {"seeds": [1234], "train_examples": 400, "epochs": 2, "lr": 5e-4},
              "starts": {"pretrained": {}}, "tasks": {"social-iqa": {"runs": runs, **summarise(runs),
                                                                     "kind": "multiple_choice"}}}  # fmt: skip
    _update_card(open_pretrained(str(export)), result)
    meta, text = read_card(export / "README.md")
    (index,) = meta["model-index"]
    (entry,) = index["results"]
    assert index["name"] == "handoff-bert" and entry["task"]["type"] == "multiple-choice"
    assert entry["dataset"]["name"] == "social-iqa" and entry["metrics"][0]["value"] == 0.4
    assert "| social-iqa | accuracy | 0.4000 | 0.3500 | +0.0500 | 0.923 | 1/1 |" in text
    from huggingface_hub import ModelCard

    (parsed,) = ModelCard.load(export / "README.md").data.eval_results  # the Hub's own reading of model-index
    assert (parsed.task_type, parsed.metric_type, parsed.metric_value) == ("multiple-choice", "accuracy", 0.4)
    assert json.loads((export / "evaluation.json").read_text())["tasks"]["social-iqa"]["gain"]["pretrained"]


def test_a_suite_skips_tasks_without_data_and_names_them(tmp_path):
    from pipeline.evaluate.command import available

    preset = tmp_path / "elsewhere.yaml"
    preset.write_text("include: " + str(Path("configs/finetune/spam.yaml").resolve()) +
                      "\ndata:\n  train:\n    path: /nowhere/mails.tgz\n")  # fmt: skip
    keep, skipped = available(["demo-sentiment", str(preset)])
    assert keep == ["demo-sentiment"] and skipped == {"elsewhere": "no data here: /nowhere/mails.tgz"}
    with pytest.raises(UserError, match="task 'nope': no fine-tuning preset"):
        available(["nope"])


def test_runs_uri_fetches_an_export_logged_as_run_artifacts(registered, tmp_path):
    """runs:/RUN_ID/PATH: an export logged as artifacts of a run (what export does without --register)."""
    from mlflow.tracking import MlflowClient

    from pipeline.export.registry import fetch

    out, printed, store, _ = registered
    run_id = printed["mlflow_run_id"]
    MlflowClient(tracking_uri=store).log_artifacts(run_id, str(out), artifact_path="handoff-copy")
    directory, origin = fetch(f"runs:/{run_id}/handoff-copy", store, tmp_path / "fetched", marker="manifest.json")
    source = open_pretrained(str(directory))
    assert source.lineage["registry"] == {**origin, "tracking_uri": store} and origin["path"] == "handoff-copy"
    assert sha256_file(directory / "model.safetensors") == sha256_file(out / "model.safetensors")
    with pytest.raises(UserError, match="holds no manifest.json; it is not a hand-off of this pipeline"):
        fetch(f"runs:/{run_id}/handoff-copy/tokenizer.json", store, tmp_path / "file", marker="manifest.json")
    with pytest.raises(UserError, match="no run 0123456789abcdef"):
        fetch("runs:/0123456789abcdef/x", store, tmp_path / "none", marker="manifest.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fetched"]  # failed downloads leave nothing


def test_the_card_states_the_objective_and_schedule_as_configured(registered):
    from pipeline.export.card import metadata, objective_tag, render

    out, _, _, _ = registered
    manifest = json.loads((out / "manifest.json").read_text())
    assert objective_tag("bert", manifest["training_config"]) == "mlm+nsp"
    manifest["training_config"]["objective"] = {"nsp_weight": 0.0}
    assert objective_tag("bert", manifest["training_config"]) == "mlm"
    assert "mlm" in metadata(manifest, "x", None)["tags"]
    assert "only (objective.nsp_weight 0: the next-sentence head was not trained)" in render(manifest, "x")
    assert "schedule: 4 warm-up steps" in render(manifest, "x")  # the debug preset's
    manifest["training_config"]["schedule"].update(warmup_steps=-1, warmup_ratio=0.01)  # -1: the ratio decides
    assert "schedule: warm-up over 1.0% of train.max_steps" in render(manifest, "x")
