"""Configuration of `python -m pipeline finetune`: starting point, task, data, head and optimisation.

The training sections (optim, schedule, train, checkpoint, tracking, deepspeed) are pre-training's own, so
fine-tuning runs through the same loop and the same DeepSpeed settings. What is specific to fine-tuning lives
in ``init`` (where the weights come from), ``task`` (what is predicted and how inputs are built), ``data``
(where the examples come from) and ``finetune`` (the head and the transfer recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import option, section
from pipeline.export.registry import RegistryConfig
from pipeline.train.config import (
    CheckpointConfig,
    DeepSpeedSection,
    OptimConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
)

FORMATS = ("auto", "json", "jsonl", "csv", "tsv", "parquet", "squad", "bigbench", "json_archive")


@dataclass
class InitConfig:
    """Where the model comes from."""

    checkpoint: str = option(
        "",
        "a pre-training checkpoint (tag, run or checkpoints directory), an export directory, or an export in the "
        "MLflow Model Registry: models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH (the registry: "
        "--tracking-uri, else MLFLOW_TRACKING_URI; downloaded into train.output_dir/init_model)",
        aliases=("--checkpoint",),
        path=True,
    )
    weights: Literal["pretrained", "random"] = option(
        "pretrained",
        "pretrained: the checkpoint's body (and BERT pooler); random: the same architecture and tokenizer, freshly "
        "initialised (the baseline that shows what pre-training bought)",
    )


@dataclass
class SourceConfig:
    """One data file and how its records become examples."""

    path: str = option(
        "", "a file (.gz allowed); json_archive: a tar(.gz) or directory of one-record .json files", path=True
    )
    format: Literal[FORMATS] = option(
        "auto",
        "json (a JSON array of records), jsonl, csv, tsv, parquet, squad (SQuAD v1.1/v2.0 JSON), bigbench "
        "(task.json: input + target_scores), json_archive; auto: from the file name (.json: from its content)",
    )
    text_field: str = option("text", "field of the text (CSV/TSV without header: the column number)")
    text_pair_field: str = option("", "field of the second text of a pair (empty: see pair_separator)")
    label_field: str = option("label", "field of the label (bigbench: the best of target_scores)")
    choices_field: str = option("choices", "multiple choice: field holding the list of choices (bigbench: its keys)")
    pair_separator: str = option(
        "", "split the text into A and B at the first occurrence of this string (VitaMinC in BIG-bench: '\\nClaim: ')"
    )
    header: bool = option(True, "CSV/TSV: the first row names the columns")
    label_threshold: float | None = option(
        None, "numeric labels: value > threshold is task.labels[1], else task.labels[0] (ratings -> sentiment)"
    )
    label_map: dict[str, str] = option(
        {}, "raw label value -> task label, compared as text (e.g. {spam-1: spam, easy-ham-1: ham}, {0: negative})"
    )
    text_format: Literal["plain", "email"] = option(
        "plain", "email: the text is a raw mail; keep the Subject and the decoded text of the body (HTML stripped)"
    )


@dataclass
class DataConfig:
    """Training and evaluation examples."""

    train: SourceConfig = section(SourceConfig)
    dev: SourceConfig = section(SourceConfig)
    dev_fraction: float = option(
        0.1, "without data.dev.path: hold out this share of the training file (SQuAD: whole articles) as dev set"
    )
    max_train_examples: int = option(0, "use a seeded random subset of at most this many training examples (0: all)")
    max_dev_examples: int = option(0, "evaluate on a seeded random subset of at most this many examples (0: all)")
    seed: int = option(1234, "seed of the dev hold-out and of the subsets")
    subset_seed: int | None = option(
        None,
        "seed of the max_train_examples subset only (None: data.seed): another draw of the training examples "
        "with the same dev set, so that a pre-training run that held that dev set out stays clean",
    )

    def __post_init__(self) -> None:
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"data.dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if self.max_train_examples < 0 or self.max_dev_examples < 0:
            raise ValueError("data.max_train_examples and data.max_dev_examples must be >= 0")


@dataclass
class TaskConfig:
    """What is predicted, and how examples become model inputs."""

    kind: Literal["classification", "pair_classification", "squad", "multiple_choice"] = option(
        "classification",
        "classification: one text; pair_classification: two texts (entailment, fact verification); squad: "
        "extractive QA (start/end over the context); multiple_choice: one score per choice, softmax over them",
    )
    labels: list[str] = option([], "classification: the label set, in class-index order (others are an error)")
    max_seq_len: int = option(128, "tokens per input, special tokens included (at most the model's positions)")
    doc_stride: int = option(64, "squad: tokens between the starts of consecutive windows over a long context")
    max_query_len: int = option(32, "squad: question tokens kept (longer questions are truncated and counted)")
    max_answer_len: int = option(30, "squad: longest answer span, in tokens, considered at prediction")
    n_best: int = option(20, "squad: start and end candidates per window; n-best answers kept per question")
    version_2: bool = option(False, "squad: questions may have no answer (SQuAD 2.0: [CLS] / extract score)")
    unanswerable_fraction: float = option(
        0.0,
        "squad 2.0 emulation: pair this share of the questions with a paragraph of another article (no answer)",
    )

    def __post_init__(self) -> None:
        if self.kind in ("classification", "pair_classification") and len(self.labels) < 2:
            raise ValueError(f"task.labels: {self.kind} needs at least two labels, got {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task.labels: duplicates in {self.labels}")
        if self.max_seq_len < 8:
            raise ValueError(f"task.max_seq_len must be >= 8, got {self.max_seq_len}")
        if self.kind == "squad":
            if self.max_query_len + 8 > self.max_seq_len:
                raise ValueError("task.max_query_len leaves no room for the context within task.max_seq_len")
            if not 0 < self.doc_stride <= self.max_seq_len - self.max_query_len - 3:
                raise ValueError("task.doc_stride must be > 0 and fit in the context part of a window")
        if not 0 <= self.unanswerable_fraction < 1:
            raise ValueError("task.unanswerable_fraction must be in [0, 1)")
        if self.unanswerable_fraction and not self.version_2:
            raise ValueError("task.unanswerable_fraction needs task.version_2 true")


@dataclass
class FinetuneConfig:
    """The head and the transfer recipe (BERT and GPT-1 papers)."""

    epochs: float = option(3.0, "training length in epochs over the training set (sets train.max_steps; 0: use it)")
    head_dropout: float = option(0.1, "dropout before the new head")
    pooling: Literal["summary", "mean"] = option(
        "summary",
        "what a sequence-level head (classification, multiple choice) reads: summary = BERT's pooled [CLS] or "
        "GPT-1's extract token (the papers); mean = the mean of the final states over the real tokens, which "
        "small pre-trained models whose attention is still local transfer better through",
    )
    dropout: float | None = option(
        None, "hidden and attention dropout of the body (None: the checkpoint's, 0.1 in both papers)"
    )
    body_lr_scale: float = option(
        1.0, "learning rate of the pre-trained body (and BERT's pooler) as a share of optim.lr, the head's rate"
    )
    layer_decay: float = option(
        1.0, "layer-wise decay: block i of L gets body_lr_scale * decay^(L-1-i), embeddings decay^L (1 = off)"
    )
    aux_lm_weight: float = option(
        0.0, "GPT-1: weight of the auxiliary language-modelling loss on the fine-tuning inputs (paper: 0.5)"
    )
    packing: bool = option(
        False,
        "BERT sentence / pair classification: lay each micro-batch's examples into as few rows of "
        "task.max_seq_len as fit them, attention kept within each example (same losses, fewer rows computed; "
        "README: when to turn it on)",
    )
    eval_every: int = option(0, "evaluate on the dev set every N steps (0: once per epoch) and at the end")
    eval_batch_size: int = option(64, "examples (SQuAD: windows) per evaluation batch on one rank")
    metric: str = option("", "dev metric that selects the best checkpoint (default: accuracy; squad: f1 / best_f1)")

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError("finetune.epochs must be >= 0")
        if not 0 <= self.head_dropout < 1 or (self.dropout is not None and not 0 <= self.dropout < 1):
            raise ValueError("finetune.head_dropout and finetune.dropout must be in [0, 1)")
        if self.body_lr_scale < 0 or not 0 < self.layer_decay <= 1:
            raise ValueError("finetune.body_lr_scale must be >= 0 and finetune.layer_decay in (0, 1]")
        if self.aux_lm_weight < 0:
            raise ValueError("finetune.aux_lm_weight must be >= 0")
        if self.eval_every < 0 or self.eval_batch_size < 1:
            raise ValueError("finetune.eval_every must be >= 0 and finetune.eval_batch_size >= 1")


@dataclass
class FinetuneJobConfig:
    """`python -m pipeline finetune`. The training sections default to pre-training's values; the presets in
    configs/finetune/ include base.yaml, which sets the fine-tuning recipe (AdamW, warmup, linear decay)."""

    init: InitConfig = section(InitConfig)
    task: TaskConfig = section(TaskConfig)
    data: DataConfig = section(DataConfig)
    tokenizer: str = option(
        "",
        "tokenizer directory (default: the checkpoint's); must be the one the checkpoint was trained with",
        path=True,
    )
    finetune: FinetuneConfig = section(FinetuneConfig)
    optim: OptimConfig = section(OptimConfig)
    schedule: ScheduleConfig = section(ScheduleConfig)
    train: TrainConfig = section(TrainConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    tracking: TrackingConfig = section(TrackingConfig)
    deepspeed: DeepSpeedSection = section(DeepSpeedSection)
    registry: RegistryConfig = section(RegistryConfig)  # the best model as a registered version (--register)
