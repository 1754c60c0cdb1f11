"""The hand-off against a real `mlflow server`: a tiny BERT and a tiny GPT pre-trained with the server as their
tracking store, exported with --register, found through MlflowClient, fine-tuned from models:/NAME/1 and
models:/NAME@alias, their lineage checked, the model card parsed, and `evaluate` run on two small tasks."""

from __future__ import annotations

import json

import pytest
from conftest import require_shared_data, run_cli
from finetune_data import bigbench_slice, pretrained_run
from mlflow_server import mlflow_server
from test_handoff import check_card

from pipeline.export.registry import FORMAT_TAG

pytestmark = pytest.mark.slow

FAST = ("--train.micro_batch_size", "8", "--train.global_batch_size", "8", "--finetune.epochs", "1",
        "--optim.lr", "1e-3", "--train.loss_curve", "false", "--tracking.system_metrics", "false")  # fmt: skip


def test_registry_hand_off_through_a_real_server(tmp_path, small_tokenizer):
    data = require_shared_data()
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path / "server") as (url, _):
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        runs, exports = {}, {}
        for arch in ("bert", "gpt"):
            runs[arch] = pretrained_run(tmp_path, small_tokenizer, arch, extra=("--tracking-uri", url))
            exports[arch] = tmp_path / f"export-{arch}"
            run_cli("export", "--checkpoint", str(runs[arch]), "--output", str(exports[arch]), "--register",
                    f"tiny-{arch}", "--alias", "champion")  # the training's store is the server  # fmt: skip
            check_card(exports[arch], runs[arch])

        # the versions, found through the client: models of the pre-training runs, tagged with their lineage
        for arch in ("bert", "gpt"):
            (version,) = client.search_model_versions(f"name='tiny-{arch}'")
            manifest = json.loads((exports[arch] / "manifest.json").read_text())
            assert version.run_id == manifest["mlflow_run_id"] and version.tags[FORMAT_TAG] == "pipeline-export/1"
            assert version.tags["step"] == "4" and version.tags["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
            assert version.tags["objective"] == {"bert": "mlm+nsp", "gpt": "causal-lm"}[arch]
            assert str(client.get_model_version_by_alias(f"tiny-{arch}", "champion").version) == "1"

        # fine-tune from models:/NAME/1 and models:/NAME@champion; the fine-tuning runs go to the server too
        vitaminc = bigbench_slice(data, "vitaminc_task.json.gz", tmp_path / "vitaminc.json", 48)
        siqa = bigbench_slice(data, "social_iqa_task.json.gz", tmp_path / "siqa.json", 48)
        cases = [("bert", "models:/tiny-bert/1", "vitaminc", vitaminc), ("gpt", "models:/tiny-gpt@champion",
                 "social-iqa", siqa)]  # fmt: skip
        for arch, uri, preset, path in cases:
            out = tmp_path / f"ft-{arch}"
            proc = run_cli("finetune", "--config", f"configs/finetune/{preset}.yaml", "--checkpoint", uri,
                           "--tracking-uri", url, "--data.train.path", str(path), "--train.output_dir", str(out),
                           "--data.dev_fraction", "0.25", *FAST, "--register", f"tiny-{arch}-{preset}")  # fmt: skip
            lineage = json.loads((out / "lineage.json").read_text())
            origin = lineage["init"]["registered_model"]
            assert (origin["name"], origin["version"], origin["tracking_uri"]) == (f"tiny-{arch}", 1, url)
            assert origin["alias"] == ("champion" if "@" in uri else None)
            assert lineage["pretraining"]["mlflow_run_id"] == json.loads(
                (exports[arch] / "manifest.json").read_text())["mlflow_run_id"]  # fmt: skip
            report = json.loads((out / "report.json").read_text())
            tags = client.get_run(report["mlflow_run_id"]).data.tags
            assert (tags["registered_model_name"], tags["registered_model_version"]) == (f"tiny-{arch}", "1")
            assert tags["init_model_uri"] == uri and tags["arch"] == arch
            registered = json.loads(proc.stdout.strip().splitlines()[-1])["registered"]
            version = client.get_model_version(registered["name"], str(registered["version"]))
            assert version.tags["parent_model_name"] == f"tiny-{arch}" and version.tags["parent_model_version"] == "1"

        # evaluate the registered BERT on two small tasks, against random initialisation
        suite = tmp_path / "suite.yaml"
        overrides = {"vitaminc": ["--data.train.path", str(vitaminc), "--data.dev_fraction", "0.25"]}
        suite.write_text(json.dumps({"tasks": ["demo-sentiment", "vitaminc"], "seeds": [1234], "train_examples": 48,
                                     "dev_examples": 32, "epochs": 1, "lr": 1e-3,
                                     "task_overrides": overrides}))  # fmt: skip
        report_dir = tmp_path / "evaluation"
        proc = run_cli("evaluate", "--checkpoint", "models:/tiny-bert@champion", "--tracking-uri", url, "--suite",
                       str(suite), "--baseline", "random", "--output", str(report_dir))  # fmt: skip
        printed = json.loads(proc.stdout.strip().splitlines()[-1])
        result = json.loads((report_dir / "evaluation.json").read_text())
        assert set(result["tasks"]) == {"demo-sentiment", "vitaminc"} and result["skipped"] == {}
        for t in result["tasks"].values():
            assert t["metrics"] == ["accuracy", "macro_f1"] and set(t["mean"]) == {"pretrained", "random"}
            for metric in t["metrics"]:  # the gain is the difference of the means, per task and metric
                assert t["gain"]["pretrained"][metric] == pytest.approx(
                    t["mean"]["pretrained"][metric] - t["mean"]["random"][metric], abs=1e-3)  # fmt: skip
        assert (report_dir / "evaluation.png").stat().st_size > 5000
        assert "| vitaminc | accuracy / macro_f1 |" in (report_dir / "evaluation.md").read_text()
        assert "version 1 of tiny-bert" in printed["mlflow"]
        version = client.get_model_version("tiny-bert", "1")
        vitaminc_acc = result["tasks"]["vitaminc"]["mean"]["pretrained"]["accuracy"]
        assert float(version.tags["eval.vitaminc.accuracy"]) == pytest.approx(vitaminc_acc)
        assert "| demo-sentiment |" in version.description
        run_id = version.run_id
        history = client.get_metric_history(run_id, "eval/vitaminc/accuracy")
        assert [m.value for m in history] == [pytest.approx(vitaminc_acc)]
        assert {"evaluation/evaluation.json", "evaluation/README.md"} <= {
            a.path for a in client.list_artifacts(run_id, "evaluation")}  # fmt: skip
        meta, _ = check_card(report_dir / "model", runs["bert"])  # the card of the evaluated copy
        names = [r["dataset"]["name"] for r in meta["model-index"][0]["results"]]
        assert names == ["demo-sentiment", "vitaminc"]
