"""What each kind of task adds to the shared step: features, batches, loss and dev-set scores.

A ``Problem`` turns examples into features (counting truncation and what was skipped), pads features into a
batch, computes the task loss from the model's output, and scores the dev set from the model's outputs per
feature (logits as numpy arrays, gathered from every rank).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.finetune.config import TaskConfig
from pipeline.finetune.heads import FinetuneOutput, span_loss
from pipeline.finetune.inputs import Encoded, InputFormat
from pipeline.finetune.squad import SquadFeaturizer, postprocess, references
from pipeline.finetune.squad_metrics import squad_v1, squad_v2
from pipeline.tokenizer.spm import Tokenizer

PAD_MULTIPLE = 8  # batches are padded to their longest input, rounded up to this


class Problem(Protocol):
    head: str
    num_labels: int
    default_metric: str

    def features(self, examples: list, training: bool) -> tuple[list, dict]: ...

    def collate(self, features: list) -> dict[str, Tensor]: ...

    def loss(self, output: FinetuneOutput, batch: dict) -> tuple[Tensor, dict[str, Tensor]]: ...

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def outputs(self, output: FinetuneOutput, batch: dict) -> list[np.ndarray]: ...

    def score(self, examples: list, features: list, outputs: list) -> tuple[dict, dict]: ...


def _pad(rows: list[list[int]], length: int) -> Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _padded_length(rows: list[list[int]]) -> int:
    longest = max(len(r) for r in rows)
    return -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE


def _encoded_batch(encoded: list[Encoded], length: int | None = None) -> dict[str, Tensor]:
    rows = [e.input_ids for e in encoded]
    length = length or _padded_length(rows)
    mask = _pad([[1] * len(r) for r in rows], length)
    return {
        "input_ids": _pad(rows, length),
        "token_type_ids": _pad([e.token_type_ids for e in encoded], length),
        "attention_mask": mask,
        "summary_index": torch.tensor([e.summary_index for e in encoded], dtype=torch.long),
    }


def _ratio(sums: dict[str, float], a: str, b: str) -> float | None:
    return sums[a] / sums[b] if sums.get(b) else None


class ClassificationProblem:
    """One text or a pair -> one of ``task.labels``. Scores: accuracy, macro F1, confusion matrix."""

    head = "classify"
    default_metric = "accuracy"

    def __init__(self, task: TaskConfig, tokenizer: Tokenizer, fmt: InputFormat):
        self.labels = list(task.labels)
        self.num_labels = len(self.labels)
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.pair = task.kind == "pair_classification"

    def features(self, examples: list, training: bool) -> tuple[list, dict]:
        first = self.tokenizer.encode([e.text for e in examples])
        second = self.tokenizer.encode([e.text_pair or "" for e in examples]) if self.pair else None
        out, truncated = [], 0
        for i, e in enumerate(examples):
            enc = self.fmt.pair(first[i], second[i]) if self.pair else self.fmt.single(first[i])
            truncated += enc.truncated
            out.append((enc, e.label))
        return out, {"features": len(out), "truncated": truncated}

    def collate(self, features: list) -> dict[str, Tensor]:
        batch = _encoded_batch([f[0] for f in features])
        batch["labels"] = torch.tensor([f[1] for f in features], dtype=torch.long)
        return batch

    def loss(self, output: FinetuneOutput, batch: dict):
        logits = output.logits.float()
        loss = F.cross_entropy(logits, batch["labels"])
        n = batch["labels"].numel()
        correct = (logits.detach().argmax(-1) == batch["labels"]).sum()
        return loss, {"task_loss_sum": loss.detach() * n, "task_count": n, "task_correct": correct}

    def train_metrics(self, sums):
        return {
            "task_loss": _ratio(sums, "task_loss_sum", "task_count"),
            "train_acc": _ratio(sums, "task_correct", "task_count"),
        }

    def outputs(self, output: FinetuneOutput, batch: dict) -> list[np.ndarray]:
        return list(output.logits.float().cpu().numpy())

    def score(self, examples: list, features: list, outputs: list) -> tuple[dict, dict]:
        gold = np.array([f[1] for f in features])
        pred = np.array([int(np.argmax(o)) for o in outputs])
        C = self.num_labels
        confusion = np.zeros((C, C), dtype=np.int64)  # rows: gold, columns: predicted
        np.add.at(confusion, (gold, pred), 1)
        f1s = []
        for c in range(C):
            tp = confusion[c, c]
            precision = tp / confusion[:, c].sum() if confusion[:, c].sum() else 0.0
            recall = tp / confusion[c].sum() if confusion[c].sum() else 0.0
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        metrics = {"accuracy": float((gold == pred).mean()), "macro_f1": float(np.mean(f1s))}
        details = {
            "labels": self.labels,
            "confusion": confusion.tolist(),
            "per_label_f1": dict(zip(self.labels, map(float, f1s), strict=True)),
            "predictions": [
                {"uid": e.uid, "label": self.labels[g], "predicted": self.labels[p]}
                for e, g, p in zip(examples, gold, pred, strict=True)
            ],
        }
        return metrics, details


class ChoiceProblem:
    """A context and K choices -> the right choice: one scalar per (context, choice) input, softmax over K."""

    head = "choice"
    num_labels = 1
    default_metric = "accuracy"

    def __init__(self, task: TaskConfig, tokenizer: Tokenizer, fmt: InputFormat):
        self.tokenizer = tokenizer
        self.fmt = fmt

    def features(self, examples: list, training: bool) -> tuple[list, dict]:
        contexts = self.tokenizer.encode([e.context for e in examples])
        out, truncated = [], 0
        for e, ctx in zip(examples, contexts, strict=True):
            encs = [self.fmt.pair(ctx, ids) for ids in self.tokenizer.encode(e.choices)]
            truncated += any(enc.truncated for enc in encs)
            out.append((encs, e.label))
        return out, {"features": len(out), "truncated": truncated}

    def collate(self, features: list) -> dict[str, Tensor]:
        K = max(len(f[0]) for f in features)
        length = _padded_length([enc.input_ids for f in features for enc in f[0]])
        filler = Encoded([0], [0], 0)  # a padded choice: masked out of the softmax
        rows = [enc for f in features for enc in (f[0] + [filler] * (K - len(f[0])))]
        flat = _encoded_batch(rows, length)
        batch = {k: v.view(len(features), K, *v.shape[1:]) for k, v in flat.items()}
        batch["choice_mask"] = torch.tensor([[k < len(f[0]) for k in range(K)] for f in features])
        batch["labels"] = torch.tensor([f[1] for f in features], dtype=torch.long)
        return batch

    loss = ClassificationProblem.loss
    train_metrics = ClassificationProblem.train_metrics

    def outputs(self, output: FinetuneOutput, batch: dict) -> list[np.ndarray]:
        return list(output.logits.float().cpu().numpy())

    def score(self, examples: list, features: list, outputs: list) -> tuple[dict, dict]:
        gold = np.array([f[1] for f in features])
        pred = np.array([int(np.argmax(o)) for o in outputs])
        details = {
            "predictions": [
                {"uid": e.uid, "answer": e.choices[g], "predicted": e.choices[p]}
                for e, g, p in zip(examples, gold, pred, strict=True)
            ]
        }
        return {"accuracy": float((gold == pred).mean())}, details


class SquadProblem:
    """Extractive QA: start/end logits over each window's context; EM / F1 as the official scripts."""

    head = "span"
    num_labels = 2

    def __init__(self, task: TaskConfig, tokenizer: Tokenizer, fmt: InputFormat):
        self.task = task
        self.featurizer = SquadFeaturizer(tokenizer, fmt, task.max_query_len, task.doc_stride)
        self.default_metric = "best_f1" if task.version_2 else "f1"

    def features(self, examples: list, training: bool) -> tuple[list, dict]:
        features, stats = self.featurizer.features(examples, training)
        return features, stats.as_dict()

    def collate(self, features: list) -> dict[str, Tensor]:
        rows = [f.input_ids for f in features]
        length = _padded_length(rows)
        return {
            "input_ids": _pad(rows, length),
            "token_type_ids": _pad([f.token_type_ids for f in features], length),
            "attention_mask": _pad([[1] * len(r) for r in rows], length),
            "start_positions": torch.tensor([f.start_position for f in features], dtype=torch.long),
            "end_positions": torch.tensor([f.end_position for f in features], dtype=torch.long),
        }

    def loss(self, output: FinetuneOutput, batch: dict):
        loss = span_loss(output.logits, batch["start_positions"], batch["end_positions"])
        n = batch["start_positions"].numel()
        return loss, {"task_loss_sum": loss.detach() * n, "task_count": n}

    def train_metrics(self, sums):
        return {"task_loss": _ratio(sums, "task_loss_sum", "task_count")}

    def outputs(self, output: FinetuneOutput, batch: dict) -> list[np.ndarray]:
        lengths = batch["attention_mask"].sum(-1).tolist()
        logits = output.logits.float().cpu().numpy()  # (B, T, 2)
        return [logits[i, : lengths[i]] for i in range(len(lengths))]

    def score(self, examples: list, features: list, outputs: list) -> tuple[dict, dict]:
        results = postprocess(
            examples, features, [o[:, 0] for o in outputs], [o[:, 1] for o in outputs], self.featurizer,
            self.task.n_best, self.task.max_answer_len,
        )  # fmt: skip
        refs = references(examples)
        predictions = {qid: r["text"] for qid, r in results.items()}
        if self.task.version_2:
            na = {qid: r["null_score_diff"] for qid, r in results.items()}
            metrics = squad_v2(predictions, {q: v if math.isfinite(v) else 1e9 for q, v in na.items()}, refs)
            final = {q: "" if na[q] > metrics["best_f1_thresh"] else predictions[q] for q in predictions}
        else:
            metrics = squad_v1(predictions, refs)
            final = predictions
        details = {"predictions": final, "nbest": {q: r["nbest"] for q, r in results.items()}}
        if self.task.version_2:
            details["null_score_diff"] = {q: r["null_score_diff"] for q, r in results.items()}
        return {k: float(v) for k, v in metrics.items()}, details
