"""The examples of a fine-tuning run: read, split into train and dev, subsampled, made into features.

Everything here is a pure function of the config and the files, so every rank computes the same sets
without talking to the others.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from pipeline.finetune.config import DataConfig, FinetuneJobConfig, SourceConfig
from pipeline.finetune.inputs import InputFormat
from pipeline.finetune.problems import ChoiceProblem, ClassificationProblem, Problem, SquadProblem
from pipeline.finetune.readers import choice_examples, read_squad, text_examples
from pipeline.finetune.squad import emulate_unanswerable
from pipeline.tokenizer.spm import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    problem: Problem
    train_examples: list
    dev_examples: list
    train_features: list
    dev_features: list
    report: dict = field(default_factory=dict)  # counts by split: examples, truncated, strided, skipped, ...


def holdout(items: list, groups: list, fraction: float, seed: int) -> tuple[list, list]:
    """Split ``items`` into (train, dev) by whole groups: a seeded ``fraction`` of the groups goes to dev."""
    unique = sorted(set(groups), key=str)
    random.Random(seed).shuffle(unique)
    num_dev = min(max(1, round(fraction * len(unique))), len(unique) - 1)
    dev_groups = set(unique[:num_dev])
    train = [x for x, g in zip(items, groups, strict=True) if g not in dev_groups]
    dev = [x for x, g in zip(items, groups, strict=True) if g in dev_groups]
    return train, dev


def subset(items: list, limit: int, seed: int) -> list:
    """A seeded random subset of at most ``limit`` items, in their original order (``limit`` 0: all)."""
    if not limit or len(items) <= limit:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _read(src: SourceConfig, cfg: FinetuneJobConfig) -> list:
    kind = cfg.task.kind
    if kind == "squad":
        return read_squad(src)
    if kind == "multiple_choice":
        return choice_examples(src, cfg.task)
    return text_examples(src, cfg.task)


def _split(cfg: FinetuneJobConfig) -> tuple[list, list]:
    data: DataConfig = cfg.data
    train = _read(data.train, cfg)
    if data.dev.path:
        dev = _read(data.dev, cfg)
    else:
        groups = [e.article for e in train] if cfg.task.kind == "squad" else list(range(len(train)))
        train, dev = holdout(train, groups, data.dev_fraction, data.seed)
    train = subset(train, data.max_train_examples, data.seed if data.subset_seed is None else data.subset_seed)
    dev = subset(dev, data.max_dev_examples, data.seed + 1)
    if cfg.task.kind == "squad" and cfg.task.unanswerable_fraction:
        train = emulate_unanswerable(train, cfg.task.unanswerable_fraction, data.seed + 2)
        dev = emulate_unanswerable(dev, cfg.task.unanswerable_fraction, data.seed + 3)
    return train, dev


def build_problem(cfg: FinetuneJobConfig, tokenizer: Tokenizer, arch: str) -> Problem:
    fmt = InputFormat(arch, cfg.task.max_seq_len)
    if cfg.task.kind == "squad":
        return SquadProblem(cfg.task, tokenizer, fmt)
    if cfg.task.kind == "multiple_choice":
        return ChoiceProblem(cfg.task, tokenizer, fmt)
    return ClassificationProblem(cfg.task, tokenizer, fmt)


def prepare(cfg: FinetuneJobConfig, tokenizer: Tokenizer, arch: str) -> Prepared:
    problem = build_problem(cfg, tokenizer, arch)
    train, dev = _split(cfg)
    if not train or not dev:
        from pipeline.errors import UserError

        raise UserError(f"no examples left: {len(train)} for training, {len(dev)} for evaluation")
    train_features, train_report = problem.features(train, training=True)
    dev_features, dev_report = problem.features(dev, training=False)
    report = {"train": {"examples": len(train), **train_report}, "dev": {"examples": len(dev), **dev_report}}
    for split, counts in report.items():
        notable = {
            k: v for k, v in counts.items() if v and k not in ("examples", "features") and not isinstance(v, list)
        }
        if notable:
            log.info("%s: %s", split, ", ".join(f"{k} {v}" for k, v in notable.items()))
    return Prepared(problem, train, dev, train_features, dev_features, report)
