"""Write a fine-tuning task's training texts, labels dropped, as a pre-training corpus (JSONL, one document a line).

This is the input of domain- and task-adaptive pre-training (ULMFiT's LM fine-tuning, Gururangan et al.'s
DAPT/TAPT): continue pre-training a checkpoint on the text of the task before fine-tuning on its labels. The
examples are read and split exactly as `python -m pipeline finetune` reads and splits them with the same
config, so the dev split is never written: a model adapted on this file has not read the texts it is scored
on. All of the training split is written (data.max_train_examples does not apply: the texts of unlabelled
examples are what this is for).

A document is each distinct text: a classification text; both texts of a pair; a multiple-choice context and
its choices; a SQuAD context and its questions. Repeated texts (VitaminC's evidence, SQuAD's contexts, which
many questions share) are written once; the counts are printed.

example:
  python -m pipeline unlabeled --config configs/finetune/movie-sentiment.yaml --output data_shards/adapt/movie.jsonl.gz
  python -m pipeline tokenizer ... / shard ... / train --train.init_from runs/general ...
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args
from pipeline.errors import UserError
from pipeline.finetune.config import FinetuneJobConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="FILE", help="the corpus to write (.jsonl or .jsonl.gz)")
    add_config_arguments(parser, FinetuneJobConfig)


def example_texts(example) -> list[str]:
    """The texts one example shows the model, in reading order."""
    from pipeline.finetune.readers import ChoiceExample, SquadExample, TextExample

    if isinstance(example, TextExample):
        return [example.text, *([example.text_pair] if example.text_pair else [])]
    if isinstance(example, ChoiceExample):
        return [example.context, *example.choices]
    if isinstance(example, SquadExample):
        return [example.context, example.question]
    raise TypeError(f"no texts for {type(example).__name__}")


def training_texts(cfg: FinetuneJobConfig) -> tuple[list[str], dict]:
    """The distinct texts of the training split (first occurrence order) and the counts behind them."""
    from dataclasses import replace

    from pipeline.finetune.data import _split

    cfg = replace(cfg, data=replace(cfg.data, max_train_examples=0))
    train, dev = _split(cfg)
    seen: dict[str, None] = {}
    total = empty = 0
    for example in train:
        for text in example_texts(example):
            total += 1
            text = text.strip()
            if not text:
                empty += 1
                continue
            seen.setdefault(text, None)
    texts = list(seen)
    counts = {
        "train_examples": len(train),
        "dev_examples_held_out": len(dev),
        "texts": total,
        "empty": empty,
        "duplicates": total - empty - len(texts),
        "documents": len(texts),
        "words": sum(len(t.split()) for t in texts),
    }
    return texts, counts


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(FinetuneJobConfig, args)
    if not cfg.data.train.path:
        raise UserError("data.train.path: a training file is required")
    out = Path(args.output)
    if not (out.name.endswith(".jsonl") or out.name.endswith(".jsonl.gz")):
        raise UserError(f"--output {out}: name it .jsonl or .jsonl.gz (the formats the tokenizer and shard read)")
    texts, counts = training_texts(cfg)
    if not texts:
        raise UserError(f"{cfg.data.train.path}: no training texts to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    opener = gzip.open if out.name.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # never a half-written corpus under the final name
    print(
        f"{out}: {counts['documents']} documents, {counts['words']} words from the {counts['train_examples']} "
        f"training examples of {cfg.data.train.path} ({counts['duplicates']} repeated and {counts['empty']} "
        f"empty texts not written; {counts['dev_examples_held_out']} dev examples held out)",
        file=sys.stderr,
    )
    print(json.dumps({"output": str(out), **counts}))
    return 0
