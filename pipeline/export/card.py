"""The model card of an export: ``README.md`` with YAML front matter, as the Hugging Face Hub reads it.

The metadata (language, license, ``library_name``, ``pipeline_tag``, datasets and, once `evaluate` has run,
``model-index``) is what the Hub indexes; the text says what the model is, what it was trained on and how,
how well it does, how to load it and what it cannot do. Everything comes from the export's ``manifest.json``
(its ``card`` section holds what only the export could see: the corpus, the final pre-training metrics, the
wall time) and, for the results, from ``evaluation.json``, so `evaluate` can rewrite the card later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import option

CARD_FILE = "README.md"
EVALUATION_FILE = "evaluation.json"
PIPELINE_TAGS = {"bert": "fill-mask", "gpt": "text-generation"}
# Fine-tuning task kinds as the Hub's task types (model-index results).
HUB_TASKS = {
    "classification": ("text-classification", "Text Classification"),
    "pair_classification": ("text-classification", "Text Classification"),
    "multiple_choice": ("multiple-choice", "Multiple Choice"),
    "squad": ("question-answering", "Question Answering"),
}
METRIC_NAMES = {"accuracy": "Accuracy", "macro_f1": "Macro F1", "exact_match": "Exact Match", "f1": "F1",
                "best_exact": "Best Exact", "best_f1": "Best F1"}  # fmt: skip


@dataclass
class CardConfig:
    """The model card (README.md) every export writes."""

    license: str = option(
        "other",
        "the model's license as a Hub identifier (apache-2.0, cc-by-4.0, ...); 'other' leaves it to the text, "
        "which names the pre-training data (whose licenses bind the model)",
    )
    language: list[str] = option(["en"], "languages of the pre-training text (ISO 639-1)")
    model_name: str = option("", "the model's name in the card (default: the registered name, else the directory's)")
    limitations: str = option("", "more known limits to state in the card, appended to the generated ones")


def _fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _objective(arch: str, training: dict) -> str:
    if arch == "gpt":
        return "causal language modelling (next token)"
    data = training.get("data", {})
    mask = data.get("mask_prob", 0.15)
    wwm = ", whole-word masking" if data.get("whole_word_mask") else ""
    mlm = f"masked language modelling ({mask:.0%} of tokens, at most {data.get('max_predictions_per_seq', '?')} per "
    nsp_weight = _nsp_weight(training)
    if nsp_weight == 0:
        return f"{mlm}sequence{wwm}) only (objective.nsp_weight 0: the next-sentence head was not trained)"
    weight = "" if nsp_weight == 1 else f" (weight {nsp_weight})"
    return f"{mlm}sequence{wwm}) + next-sentence prediction{weight}"


def _nsp_weight(training: dict) -> float:
    return float((training.get("objective") or {}).get("nsp_weight", 1.0))


def objective_tag(arch: str, training: dict | None = None) -> str:
    if arch == "gpt":
        return "causal-lm"
    return "mlm" if _nsp_weight(training or {}) == 0 else "mlm+nsp"


def model_index(name: str, evaluation: dict) -> list[dict]:
    """``model-index`` entries: one result per task, the pre-trained start's mean dev scores."""
    results = []
    for task, t in evaluation.get("tasks", {}).items():
        start = next(iter(t["mean"]))
        hub_type, hub_name = HUB_TASKS.get(t.get("kind", ""), ("text-classification", "Text Classification"))
        metrics = [{"type": k, "value": t["mean"][start][k], "name": f"{METRIC_NAMES.get(k, k)} (dev)"}
                   for k in t.get("metrics", [])]  # fmt: skip
        results.append({"task": {"type": hub_type, "name": hub_name},
                        "dataset": {"name": task, "type": task, "split": "dev"}, "metrics": metrics})  # fmt: skip
    return [{"name": name, "results": results}] if results else []


def metadata(manifest: dict, name: str, evaluation: dict | None) -> dict:
    card = manifest.get("card", {})
    arch = manifest["arch"]
    meta = {
        "language": card.get("language", ["en"]),
        "license": card.get("license", "other"),
        "library_name": "transformers",
        "pipeline_tag": PIPELINE_TAGS[arch],
        "tags": [manifest["architecture"], "pipeline-export", objective_tag(arch, manifest.get("training_config"))],
        "datasets": card.get("data", {}).get("datasets") or [],
    }
    index = model_index(name, evaluation or {})
    if index:
        meta["model-index"] = index
    return meta


def _metrics_line(metrics: dict) -> str:
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
    return ", ".join(parts) or "none logged"


def render(manifest: dict, name: str, evaluation: dict | None = None, registered: dict | None = None) -> str:
    """The card's Markdown (front matter included)."""
    card = manifest.get("card", {})
    arch, model, training = manifest["arch"], manifest["model_config"], manifest.get("training_config", {})
    train, optim, schedule = training.get("train", {}), training.get("optim", {}), training.get("schedule", {})
    data, lineage, tok = card.get("data", {}), manifest["lineage"], manifest["tokenizer"]
    meta = yaml.safe_dump(metadata(manifest, name, evaluation), sort_keys=False, allow_unicode=True)
    head = "AutoModelForMaskedLM" if arch == "bert" else "AutoModelForCausalLM"
    seq_len = data.get("seq_len") or model.get("max_position_embeddings")
    warmup = (f"{schedule['warmup_steps']} warm-up steps" if schedule.get("warmup_steps", -1) >= 0
              else f"warm-up over {schedule.get('warmup_ratio', 0):.1%} of train.max_steps")  # fmt: skip
    lines = [
        "---",
        meta.rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A {'BERT' if arch == 'bert' else 'GPT'} ({manifest['architecture']}) pre-trained from scratch with the "
        "bert-gpt-pipeline (`python -m pipeline train`), exported by `python -m pipeline export`.",
        "",
        "## Model",
        "",
        f"- Architecture: `{manifest['architecture']}`, {model['num_layers']} layers, hidden size "
        f"{model['hidden_size']}, {model['num_heads']} heads, feed-forward {model['intermediate_size']}, "
        f"{model['max_position_embeddings']} positions, {'pre' if model.get('pre_layernorm') else 'post'}-LayerNorm, "
        f"{model.get('activation', 'gelu')}; {_fmt_int(card.get('parameters'))} parameters in `model.safetensors` "
        "(tied embeddings stored once).",
        f"- Tokenizer: SentencePiece {tok.get('model_type', '')}, {_fmt_int(tok['vocab_size'])} pieces "
        f"(sha256 `{tok['sha256'][:16]}`), special tokens at fixed ids {tok.get('special_ids', {})}; "
        f"`spiece.model` is included. Embedding rows added for padding the vocabulary: "
        f"{manifest.get('vocab_padding_stripped', 0)} (stripped).",
        "",
        "## Pre-training data",
        "",
        f"- Sources: {', '.join(data.get('inputs', [])) or 'not recorded'}",
        f"- {_fmt_int(data.get('documents'))} documents, {_fmt_int(data.get('tokens'))} tokens in "
        f"{_fmt_int(data.get('samples'))} sequences of {seq_len} tokens (shards manifest sha256 "
        f"`{manifest['data_manifest_sha256']}`).",
        "",
        "## Recipe",
        "",
        f"- Objective: {_objective(arch, training)}.",
        f"- {_fmt_int(manifest['step'])} steps, batch {train.get('global_batch_size')} sequences "
        f"({_fmt_int(manifest['samples'])} sequences, {_fmt_int(manifest['tokens'])} tokens seen).",
        f"- Optimizer: {optim.get('name')} lr {optim.get('lr')}, betas {optim.get('betas')}, weight decay "
        f"{optim.get('weight_decay')}; schedule: {warmup}, then {schedule.get('decay')} decay.",
        f"- Precision {lineage.get('precision')}, DeepSpeed ZeRO stage {lineage.get('zero_stage')}, "
        f"{lineage.get('world_size')} process(es); hardware: {card.get('hardware') or 'not recorded'}; wall time "
        f"from the MLflow run's start to this checkpoint (pauses between restarts included): "
        f"{card.get('wall_time') or 'not recorded'}.",
        f"- Final pre-training metrics (step {card.get('final_metrics_step', manifest['step'])}): "
        f"{_metrics_line(card.get('final_metrics', {}))}.",
        f"- Code: git commit `{manifest.get('git_commit')}`, torch {manifest.get('torch')}; MLflow run "
        f"`{manifest.get('mlflow_run_id')}`.",
    ]
    if registered:
        lines.append(f"- Registered in the MLflow Model Registry as `{registered['name']}`"
                     + (f" (alias `{registered['alias']}`)." if registered.get("alias") else "."))  # fmt: skip
    lines += ["", "## How to load it", "", "```python",
              "from transformers import AutoModelForSequenceClassification, AutoTokenizer, " + head, "",
              'tokenizer = AutoTokenizer.from_pretrained("PATH")  # the same ids as spiece.model',
              f'model = {head}.from_pretrained("PATH")',
              'classifier = AutoModelForSequenceClassification.from_pretrained("PATH", num_labels=2)  # new head',
              "```", ""]  # fmt: skip
    if registered:
        uri = f"models:/{registered['name']}" + (f"@{registered['alias']}" if registered.get("alias") else "/VERSION")
        lines += ["From the MLflow Model Registry (set MLFLOW_TRACKING_URI to the registry's store):", "", "```python",
                  "import mlflow", "",
                  f'path = mlflow.artifacts.download_artifacts("{uri}")  # this directory; then PATH = path',
                  "```", "",
                  f"or fine-tune from it: `python -m pipeline finetune --config configs/finetune/spam.yaml "
                  f"--checkpoint {uri}`.", ""]  # fmt: skip
    lines += ["## Evaluation", ""]
    if evaluation and evaluation.get("tasks"):
        from pipeline.evaluate.transfer import markdown_table

        budget = evaluation.get("budget", {})
        intro = (f"Fine-tuned by `python -m pipeline evaluate` (dev scores of the best evaluation, mean over seeds "
                 f"{budget.get('seeds')}; {budget.get('train_examples') or 'all'} training examples, "
                 f"{budget.get('epochs')} epochs, lr {budget.get('lr')}):")  # fmt: skip
        lines += [intro, "", markdown_table(evaluation), ""]
    else:
        lines += ["Not evaluated yet: `python -m pipeline evaluate --checkpoint PATH` fine-tunes it on the bundled "
                  "tasks and adds the results here.", ""]  # fmt: skip
    limits = [
        f"Pre-trained on {_fmt_int(manifest['tokens'])} tokens: judge it by the evaluation above, not by its "
        "architecture's name; it is not a general-purpose language model.",
        f"Pre-training text in {', '.join(card.get('language', ['en']))}; sequences of at most {seq_len} tokens.",
        "It inherits the biases of its pre-training text; no filtering for toxicity or personal data was done.",
    ]
    if arch == "bert":
        limits.append("Its fill-mask head predicts pieces of its own SentencePiece vocabulary, not WordPiece.")
    else:
        limits.append("Its tokenizer adds GPT-1's [START] A [DELIM] B [EXTRACT] around inputs; pass "
                      "add_special_tokens=False for plain language modelling.")  # fmt: skip
    if card.get("limitations"):
        limits.append(card["limitations"])
    lines += ["## Known limits", "", *[f"- {line}" for line in limits], ""]
    return "\n".join(lines)


def write(directory: Path, manifest: dict) -> Path:
    """(Re)write ``README.md`` from the manifest and, if `evaluate` left one, ``evaluation.json``."""
    evaluation = None
    if (directory / EVALUATION_FILE).is_file():
        evaluation = json.loads((directory / EVALUATION_FILE).read_text(encoding="utf-8"))
    card = manifest.get("card", {})
    path = directory / CARD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(manifest, card.get("name") or directory.name, evaluation, card.get("registered")),
                   encoding="utf-8")  # fmt: skip
    tmp.replace(path)
    return path


def read(path: Path) -> tuple[dict, str]:
    """The card's metadata and text, through huggingface_hub's ModelCard when it is installed."""
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        text = path.read_text(encoding="utf-8")
        _, front, body = text.split("---\n", 2)
        return yaml.safe_load(front), body
    card = ModelCard.load(path)
    return card.data.to_dict(), card.text
