"""Small real slices of ../shared/data/finetune (and the SpamAssassin archive) for the fine-tuning tests.

Each slice keeps the original file format (TSV, BIG-bench task.json, SQuAD JSON, one-record JSON files), so the
tests read them through the same readers as the full sets.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path


def load_gz_json(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def movie_tsv(data: Path, out: Path, n: int) -> Path:
    """The first ``n`` snippets, as the original ``id<TAB>rating<TAB>text`` CRLF file."""
    with gzip.open(data / "finetune" / "movieReviewSnippets_GroundTruth.txt.gz", "rb") as fh:
        lines = [line for _, line in zip(range(n), fh, strict=False)]
    out.write_bytes(b"".join(lines))
    return out


def bigbench_slice(data: Path, name: str, out: Path, n: int, step: int = 1) -> Path:
    task = load_gz_json(data / "finetune" / name)
    task["examples"] = task["examples"][::step][:n]
    out.write_text(json.dumps(task), encoding="utf-8")
    return out


def squad_slice(data: Path, out: Path, articles: int, paragraphs: int, questions: int) -> Path:
    """The first questions of the first paragraphs of the first articles of SQuADShifts (New Wikipedia)."""
    squad = load_gz_json(data / "finetune" / "squadshifts_new_wiki_v1.0.json.gz")
    squad["data"] = squad["data"][:articles]
    for article in squad["data"]:
        article["paragraphs"] = article["paragraphs"][:paragraphs]
        for p in article["paragraphs"]:
            p["qas"] = p["qas"][:questions]
    out.write_text(json.dumps(squad), encoding="utf-8")
    return out


def spam_dir(data: Path, out: Path, per_class: int) -> Path:
    """``per_class`` spam and ham mails as one-record .json files (the archive's own layout)."""
    counts = {"spam-1": 0, "easy-ham-1": 0}
    with tarfile.open(data / "spamassassin-train.tgz", "r|gz") as tar:
        for m in tar:
            group = m.name.split("/")[1] if m.name.count("/") == 2 else ""
            if m.name.endswith(".json") and counts.get(group, per_class) < per_class:
                counts[group] += 1
                target = out / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
    return out / "data"


def pretrained_run(root: Path, tokenizer: Path, arch: str, steps: int = 4, extra: tuple[str, ...] = ()) -> Path:
    """A debug-preset pre-training run on shards of the demo-corpus subset (built once per session under
    ``root``): a checkpoint to fine-tune and export. ``arch`` "gpt2" is a pre-LN GPT (exported as GPT-2);
    ``extra``: more `train` arguments (--tracking-uri URL, say)."""
    from conftest import run_cli  # noqa: I001 - test-directory modules, imported where needed
    from data_shards import build_shards

    out = root / f"pretrain-{arch}"
    if (out / "checkpoints" / "latest").is_file():
        return out
    model_arch = "gpt" if arch == "gpt2" else arch
    extra = [*(["--model.pre_layernorm", "true"] if arch == "gpt2" else []), *extra]
    overrides = {"data.objective": model_arch, "data.seq_len": 64}
    shards = build_shards(root, tokenizer, f"shards-{model_arch}", **overrides)
    run_cli("train", "--config", "configs/pretrain/debug.yaml", "--data.shards", str(shards), "--model.arch",
            model_arch, "--train.output_dir", str(out), "--train.max_steps", str(steps), "--train.global_batch_size",
            "8", "--checkpoint.every_steps", str(steps), "--tracking.system_metrics", "false",
            "--train.loss_curve", "false", "--optim.name", "adamw", "--optim.lr", "1e-3", *extra)  # fmt: skip
    return out


def other_tokenizer(root: Path) -> Path:
    """A tokenizer that is not the one the test checkpoints were trained with (built once per session)."""
    from conftest import DEMO_CORPUS, run_cli

    out = root / "other-tokenizer"
    if not (out / "spm.model").is_file():
        run_cli("tokenizer", "--input", str(DEMO_CORPUS), "--vocab-size", "1000", "--tokenizer.max_sentences",
                "5000", "--output", str(out))  # fmt: skip
    return out
