"""The Hugging Face hand-off: export a trained debug checkpoint, load it with transformers, compare with ours.

transformers 5.x (the dev dependency) is checked in this process; 4.57 in a second virtual environment
(``.venv-hf4``, created on first use; marked slow). Both run the same script, tests/scripts/hf_export_check.py.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, require_shared_data, run_cli
from finetune_data import load_gz_json, other_tokenizer, pretrained_run

from pipeline.errors import UserError
from pipeline.export.source import open_pretrained
from pipeline.export.tokenizer import build_fast_tokenizer
from pipeline.finetune.inputs import InputFormat
from pipeline.model.builder import build_model
from pipeline.tokenizer.spm import Tokenizer, sha256_file

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from hf_export_check import check

ATOL = 2e-4
HF4_VENV = REPO / ".venv-hf4"
HF4_REQUIREMENTS = ["torch==2.13.0", "transformers==4.57.6", "safetensors", "sentencepiece", "protobuf"]


@pytest.fixture(scope="module")
def inputs():
    """Real text: movie-review snippets and VitaMinC evidence / claim pairs, plus text that spells specials."""
    data = require_shared_data()
    with gzip.open(data / "finetune" / "movieReviewSnippets_GroundTruth.txt.gz", "rt", encoding="utf-8") as fh:
        texts = [line.split("\t", 2)[2].strip() for _, line in zip(range(6), fh, strict=False)]
    texts.append("The text [MASK] and [CLS] <0x41> are only characters here.")
    vitaminc = load_gz_json(data / "finetune" / "vitaminc_task.json.gz")["examples"][:4]
    pairs = [e["input"].split("\nClaim: ", 1) for e in vitaminc]
    return {"texts": texts, "pairs": pairs}


class Exports(dict):
    """arch -> (pre-training run, its export, what export printed), each built on first use: the default tier
    needs BERT and GPT-1 only (their runs are shared with the fine-tuning tests), GPT-2 is slow-tier."""

    def __init__(self, tmp_path_factory, tokenizer: Path):
        super().__init__()
        self.factory, self.tokenizer = tmp_path_factory, tokenizer

    def __missing__(self, arch: str):
        run = pretrained_run(self.factory.getbasetemp() / "ft-pretrained", self.tokenizer, arch)
        target = self.factory.mktemp("export") / arch
        proc = run_cli("export", "--checkpoint", str(run), "--output", str(target))
        self[arch] = (run, target, json.loads(proc.stdout.strip().splitlines()[-1]))
        return self[arch]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, small_tokenizer):
    return Exports(tmp_path_factory, small_tokenizer)


def ours(run: Path, arch: str, tokenizer: Tokenizer, spec: dict) -> dict:
    """What our code computes for the same inputs: ids, token types, logits."""
    source = open_pretrained(str(run))
    model = build_model(source.model_cfg).eval()
    model.load_state_dict(source.state_dict)
    fmt = InputFormat("bert" if arch == "bert" else "gpt", 128)
    single = [fmt.single(ids) for ids in tokenizer.encode(spec["texts"])]
    first = tokenizer.encode([a for a, _ in spec["pairs"]])
    second = tokenizer.encode([b for _, b in spec["pairs"]])
    pairs = [fmt.pair(a, b) for a, b in zip(first, second, strict=True)]
    return {"model": model, "single": single, "pairs": pairs, "plain": tokenizer.encode(spec["texts"])}


def compare(hf: dict, mine: dict, arch: str) -> None:
    assert hf["plain_ids"] == mine["plain"]  # same pieces as SentencePiece; "[MASK]" in text stays text
    assert hf["single_ids"] == [e.input_ids for e in mine["single"]]
    assert hf["pair_ids"] == [e.input_ids for e in mine["pairs"]]
    if arch == "bert":
        assert hf["pair_type_ids"] == [e.token_type_ids for e in mine["pairs"]]
        assert hf["special_ids"] == {"[PAD]": 0, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(e.input_ids) for e in mine["single"]], batch_first=True)
    mask = torch.tensor(hf["attention_mask"])
    real = mask.bool()
    model = mine["model"]
    with torch.no_grad():
        if arch == "bert":
            out = model(ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask)
            lm, nsp = out.mlm_logits, out.nsp_logits
            theirs = hf["models"]["pretraining"]
            torch.testing.assert_close(torch.tensor(theirs["nsp_logits"]), nsp, atol=ATOL, rtol=0)
            masked_lm = torch.tensor(hf["models"]["masked_lm"]["logits"])
            torch.testing.assert_close(masked_lm[real], lm[real], atol=ATOL, rtol=0)
        else:
            lm = model(ids, attention_mask=mask).logits
            causal = torch.tensor(hf["models"]["causal_lm"]["logits"])
            torch.testing.assert_close(causal[real], lm[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(hf["models"]["pretraining"]["logits"])[real], lm[real], atol=ATOL, rtol=0)
    assert torch.tensor(hf["models"]["sequence_classification"]["logits"]).shape == (len(ids), 2)


@pytest.mark.parametrize("arch", ["bert", "gpt", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_export_loads_in_transformers_5_with_our_ids_and_logits(exports, inputs, small_tokenizer, arch):
    run, export, _ = exports[arch]
    hf = check(str(export), inputs["texts"], inputs["pairs"])
    assert hf["transformers"].startswith("5.")
    expected = {"bert": "BertForPreTraining", "gpt": "OpenAIGPTLMHeadModel", "gpt2": "GPT2LMHeadModel"}[arch]
    assert hf["models"]["pretraining"]["class"] == expected
    compare(hf, ours(run, arch, Tokenizer(small_tokenizer), inputs), arch)


def test_manifest_lineage_and_mlflow_artifact(exports, small_tokenizer):
    run, export, printed = exports["bert"]
    manifest = json.loads((export / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert sha256_file(export / name) == entry["sha256"] and (export / name).stat().st_size == entry["bytes"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "spiece.model"} <= set(
        manifest["files"]
    )
    mark = json.loads((run / "checkpoints" / "step_00000004" / "checkpoint.json").read_text())
    assert (manifest["step"], manifest["tokens"], manifest["mlflow_run_id"]) == (4, mark["tokens"],
                                                                                  mark["mlflow_run_id"])  # fmt: skip
    shards = Path(manifest["training_config"]["data"]["shards"])
    assert manifest["data_manifest_sha256"] == sha256_file(shards / "manifest.json")
    assert manifest["tokenizer"]["sha256"] == Tokenizer(small_tokenizer).sha256
    assert manifest["vocab_padding_stripped"] == 0 and json.loads((export / "config.json").read_text())["vocab_size"]
    assert printed["mlflow"].startswith("logged")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(mark["mlflow_run_id"], "export/step_00000004")}
    assert "export/step_00000004/manifest.json" in logged and "export/step_00000004/model.safetensors" in logged


def test_an_export_is_a_starting_point_with_the_same_weights_and_tokenizer_check(exports, tmp_path_factory):
    run, export, _ = exports["bert"]
    from_checkpoint, from_export = open_pretrained(str(run)), open_pretrained(str(export))
    assert from_export.kind == "export" and from_export.model_cfg == from_checkpoint.model_cfg
    for key, value in from_checkpoint.state_dict.items():
        torch.testing.assert_close(from_export.state_dict[key], value, atol=0, rtol=0, msg=key)
    assert from_export.tokenizer().sha256 == from_checkpoint.tokenizer().sha256
    _, gpt_export, _ = exports["gpt"]  # an export directory also serves as a tokenizer directory
    assert from_export.tokenizer(str(gpt_export)).sha256 == from_checkpoint.tokenizer_sha256
    other = other_tokenizer(tmp_path_factory.getbasetemp() / "ft-pretrained")
    with pytest.raises(UserError, match="is not the one"):
        from_export.tokenizer(str(other))


def test_fast_tokenizer_gives_sentencepiece_ids_on_real_text(small_tokenizer):
    """The converted tokenizer against SentencePiece on every movie snippet and 2,000 VitaMinC inputs."""
    data = require_shared_data()
    tok = Tokenizer(small_tokenizer)
    fast = build_fast_tokenizer(tok.directory / tok.model_file, "bert")
    fast.encode_special_tokens = True  # what split_special_tokens does in transformers
    with gzip.open(data / "finetune" / "movieReviewSnippets_GroundTruth.txt.gz", "rt", encoding="utf-8") as fh:
        texts = [line.split("\t", 2)[2].rstrip("\r\n") for line in fh]
    texts += [e["input"] for e in load_gz_json(data / "finetune" / "vitaminc_task.json.gz")[
        "examples"][:2000]]  # fmt: skip
    expected = tok.encode(texts)
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    assert sum(a != b for a, b in zip(expected, got, strict=True)) == 0


def _hf4_python() -> Path:
    python = HF4_VENV / "bin" / "python"
    probe = [str(python), "-c", "import transformers, sys; sys.exit(transformers.__version__ != '4.57.6')"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(HF4_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *HF4_REQUIREMENTS], check=True, timeout=1200)
    return python


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "gpt", "gpt2"])
def test_export_loads_in_transformers_4_57(exports, inputs, small_tokenizer, tmp_path, arch):
    python = _hf4_python()
    run, export, _ = exports[arch]
    spec = tmp_path / "inputs.json"
    spec.write_text(json.dumps(inputs))
    result = tmp_path / "hf4.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(python), str(REPO / "tests/scripts/hf_export_check.py"), str(export), str(spec), str(result)],
                   check=True, env=env, cwd=tmp_path, timeout=600)  # fmt: skip
    hf = json.loads(result.read_text())
    assert hf["transformers"] == "4.57.6" and hf["tokenizer_class"] == "PreTrainedTokenizerFast"
    compare(hf, ours(run, arch, Tokenizer(small_tokenizer), inputs), arch)


@pytest.mark.slow
def test_zero2_bf16_two_rank_checkpoint_exports_its_fp32_master_weights(tmp_path, small_tokenizer):
    """Two ranks, ZeRO-2, bf16: the module state holds bf16 copies, the fp32 master weights are partitioned over
    the ranks' optimizer files. The export must hold the consolidated fp32 masters."""
    from data_shards import build_shards

    shards = build_shards(tmp_path, small_tokenizer, "shards", **{"data.seq_len": 64})
    run = tmp_path / "run"
    args = ["train", "--config", "configs/pretrain/debug.yaml", "--data.shards", str(shards), "--train.output_dir",
            str(run), "--train.max_steps", "3", "--train.precision", "bf16", "--train.zero_stage", "2",
            "--deepspeed.config", "configs/deepspeed/zero2.json", "--train.micro_batch_size", "4",
            "--train.global_batch_size", "8", "--data.num_workers", "1", "--tracking.enabled", "false"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pipeline"]
    env = {**os.environ, "PIPELINE_PROGRESS": "0"}
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "export"
    run_cli("export", "--checkpoint", str(run), "--output", str(out), "--mlflow", "false")

    from safetensors.torch import load_file

    exported = load_file(out / "model.safetensors")
    tag = run / "checkpoints" / "step_00000003"
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    word = exported["bert.embeddings.word_embeddings.weight"]
    bf16 = module["transformer.embeddings.word.weight"][: word.size(0)]
    assert word.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(word.to(torch.bfloat16), bf16, atol=0, rtol=0)  # the masters round to the copies
    assert not torch.equal(word, bf16.float())  # and carry more precision than them
