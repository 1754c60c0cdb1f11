"""Fine-tuning as a ``Task`` of the shared training loop (``pipeline.train.loop``).

Batches: a seeded permutation per (seed, epoch), padded by wrapping to a whole number of global batches and
dealt to the ranks, so every rank has the same number of full micro-batches and ``batches(epoch, start)``
resumes exactly. Evaluation: each rank scores an equal slice of the dev features (the last slice wraps around),
the outputs are gathered on every rank and every rank computes the same scores; rank 0 writes them to
``<output>/eval/`` (history, the best evaluation's details and predictions).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.data.packing import PACKED_KEYS, max_seqlen, pack_batch
from pipeline.errors import UserError
from pipeline.finetune.config import FinetuneJobConfig
from pipeline.finetune.data import Prepared
from pipeline.finetune.heads import FinetuneModel, lm_labels_for, lr_scales
from pipeline.model.config import ModelConfig
from pipeline.model.flops import flops_per_token
from pipeline.train.loop import StepOutput, host_padding

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
BEST_IN_CHECKPOINT = "eval_best.json"  # a checkpoint's copy of eval/best.json as of its step


def _json_safe(value):
    """JSON without NaN / Infinity (not JSON): non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def restore_eval_records(out: Path, tag_dir: Path) -> None:
    """Bring ``eval/`` back to what it was at the checkpoint a run resumes from: the scores of later steps
    are dropped (they are taken again, each step's once) and best.json is the checkpoint's copy, so that a
    best score of an attempt that died before its checkpoint was published is not kept."""
    from pipeline.train.checkpoint import read_mark
    from pipeline.train.metrics import truncate_records

    step = read_mark(tag_dir)["step"]
    eval_dir = out / EVAL_DIR
    truncate_records(eval_dir / "history.jsonl", step)
    best, saved = eval_dir / "best.json", tag_dir / BEST_IN_CHECKPOINT
    if saved.is_file():
        write_json(best, json.loads(saved.read_text(encoding="utf-8")))
    elif best.is_file() and (best_step := json.loads(best.read_text(encoding="utf-8"))["step"]) > step:
        # a checkpoint from before checkpoints kept a copy: at least drop a best score from after it
        log.warning("%s: the best score of step %d is from after the checkpoint resumed from (step %d): dropped",
                    best, best_step, step)  # fmt: skip
        best.unlink()


def check_packing(cfg: FinetuneJobConfig, arch: str) -> None:
    """``finetune.packing`` is for what it is exact for: BERT, one label per text or pair, the pooled [CLS]."""
    if arch != "bert" or cfg.task.kind not in ("classification", "pair_classification"):
        raise UserError(
            f"finetune.packing: for BERT sentence and pair classification only (here: {arch}, {cfg.task.kind})"
        )
    if cfg.finetune.pooling != "summary":
        raise UserError("finetune.packing: reads each example's own [CLS]; use finetune.pooling summary")


def pack_features(batch: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
    """A classification batch in the packed layout (``pipeline/data/packing.py``): the same examples in
    fewer rows; ``summary_index`` becomes each example's flat [CLS] position (``cls_index``)."""
    arrays = {k: v.numpy() for k, v in batch.items() if k != "summary_index"}
    packed = pack_batch(arrays, seq_len, {"input_ids": 0, "token_type_ids": 0, "attention_mask": 0}, pad_to="batch")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in packed.items()}


class FinetuneTask:
    def __init__(
        self,
        cfg: FinetuneJobConfig,
        model_cfg: ModelConfig,
        prepared: Prepared,
        init_state: dict | None,
        device: torch.device,
        rank: int,
        world_size: int,
        artifacts: list[str] | None = None,
    ):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.data = prepared
        self.problem = prepared.problem
        self.init_state = init_state
        self.device = device
        self.rank, self.world = rank, world_size
        self.micro = cfg.train.micro_batch_size
        self.name = f"finetune-{cfg.task.kind}-{model_cfg.arch}"
        n = len(prepared.train_features)
        self.batches_per_epoch = -(-n // (self.micro * world_size))
        self.aux_lm = cfg.finetune.aux_lm_weight if model_cfg.arch == "gpt" else 0.0
        self.metric = cfg.finetune.metric or self.problem.default_metric
        self.out = Path(cfg.train.output_dir)
        self.eval_dir = self.out / EVAL_DIR
        self._artifacts = artifacts or []
        self.best_value = self._load_best()

    # ---- model
    def build_model(self) -> nn.Module:
        ft = self.cfg.finetune
        model = FinetuneModel(self.model_cfg, self.problem.head, self.problem.num_labels, ft.head_dropout, ft.pooling)
        if self.init_state is not None:
            model.load_pretrained(self.init_state)
        return model

    def lr_scale(self) -> dict[str, float] | None:
        ft = self.cfg.finetune
        if ft.body_lr_scale == 1.0 and ft.layer_decay == 1.0:
            return None
        return lr_scales(self.model_cfg.num_layers, ft.body_lr_scale, ft.layer_decay)

    def flops_per_token(self) -> float:
        return flops_per_token(self.model_cfg, self.cfg.task.max_seq_len, mlm_fraction=0.0)

    # ---- training batches
    def data_layout(self) -> dict:
        return {"world_size": self.world, "micro_batch_size": self.micro, "seed": self.cfg.train.seed,
                "num_features": len(self.data.train_features)}  # fmt: skip

    def epoch_order(self, epoch: int, history: list[dict] = ()) -> np.ndarray:
        """This rank's feature indices for ``epoch``: a whole number of full micro-batches.

        The epoch is a seeded permutation of the features, wrapped around to fill the last global batch and
        dealt to the ranks, so the batches consumed are a prefix of it. After a resume on another layout
        (``history``: what earlier layouts consumed) the rest of the permutation is dealt the same way.
        """
        n = len(self.data.train_features)
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(n)
        done = 0
        for h in history:
            if (h["seed"], h["num_features"]) != (self.cfg.train.seed, n):
                raise UserError("the epoch began with another seed or training set: it cannot continue exactly")
            done += min(h["batches"] * h["micro_batch_size"] * h["world_size"], n - done)
        rest = order[done:]
        batches = -(-len(rest) // (self.micro * self.world))
        return np.resize(rest, batches * self.micro * self.world)[self.rank :: self.world]  # wraps to fill

    def batches(self, epoch: int, start_batch: int, history: list[dict] = ()) -> Iterator[dict]:
        order = self.epoch_order(epoch, history)
        for b in range(start_batch, len(order) // self.micro):
            batch = self.problem.collate(
                [self.data.train_features[i] for i in order[b * self.micro : (b + 1) * self.micro]]
            )
            yield pack_features(batch, self.cfg.task.max_seq_len) if self.cfg.finetune.packing else batch

    def _model_inputs(self, batch: dict, lm_labels: bool = False) -> tuple[dict, int]:
        """The model's keyword arguments on the device, and the batch's real tokens (counted on the host)."""
        tokens, padded = host_padding(batch["attention_mask"])
        keys = ("input_ids", "token_type_ids", "attention_mask", "summary_index", "choice_mask", *PACKED_KEYS)
        inputs = {k: batch[k].to(self.device, non_blocking=True) for k in keys if k in batch}
        if "cu_seqlens" in batch:  # packed (finetune.packing): the varlen kernel's longest run, from the host
            inputs["max_seqlen"] = max_seqlen(batch["cu_seqlens"].numpy())
        if self.model_cfg.arch == "gpt":
            inputs.pop("token_type_ids", None)  # GPT-1 has no segment embeddings
        if lm_labels:
            inputs["lm_labels"] = lm_labels_for(inputs["input_ids"], inputs["attention_mask"])
        if not padded:
            inputs["attention_mask"] = None  # nothing to mask: SDPA may use its fastest kernel
        return inputs, tokens

    def forward(self, model: nn.Module, batch: dict) -> StepOutput:
        inputs, tokens = self._model_inputs(batch, lm_labels=bool(self.aux_lm))
        output = model(**inputs)
        targets = {k: v.to(self.device) for k, v in batch.items() if k not in inputs}
        loss, sums = self.problem.loss(output, targets)
        if self.aux_lm:
            loss = loss + self.aux_lm * output.lm.loss
            sums.update(lm_loss_sum=output.lm.loss.detach() * output.lm.count, lm_count=output.lm.count)
        samples = len(batch["labels"]) if "cls_index" in batch else None  # packed: examples, not rows
        return StepOutput(loss=loss, sums=sums, tokens=tokens, samples=samples)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        out = self.problem.train_metrics(sums)
        if self.aux_lm and sums.get("lm_count"):
            out["lm_loss"] = sums["lm_loss_sum"] / sums["lm_count"]
        return out

    # ---- evaluation
    @torch.no_grad()
    def predict(self, model: nn.Module) -> list[np.ndarray]:
        """Outputs for every dev feature, in order (computed in slices over the ranks, gathered on all)."""
        features = self.data.dev_features
        n = len(features)
        per_rank = -(-n // self.world)
        mine = [(self.rank * per_rank + i) % n for i in range(per_rank)]
        size = self.cfg.finetune.eval_batch_size
        was_training = model.training
        model.eval()
        local = []
        try:
            for start in range(0, len(mine), size):
                ids = mine[start : start + size]
                batch = self.problem.collate([features[i] for i in ids])
                output = model(**self._model_inputs(batch)[0])
                local.extend(zip(ids, self.problem.outputs(output, batch), strict=True))
        finally:
            model.train(was_training)
        gathered = [local]
        if self.world > 1 and dist.is_initialized():
            gathered = [None] * self.world
            dist.all_gather_object(gathered, local)
        by_index = {i: out for part in gathered for i, out in part}
        return [by_index[i] for i in range(n)]

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float] | None:
        outputs = self.predict(model)
        metrics, details = self.problem.score(self.data.dev_examples, self.data.dev_features, outputs)
        value = metrics.get(self.metric)
        if value is None:
            raise KeyError(f"finetune.metric {self.metric!r} is not one of {sorted(metrics)}")
        improved = self.best_value is None or value > self.best_value
        if improved:
            self.best_value = value
        if self.rank == 0:
            self.eval_dir.mkdir(parents=True, exist_ok=True)
            with open(self.eval_dir / "history.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(_json_safe({"step": step, **metrics})) + "\n")
            if improved:
                write_json(self.eval_dir / "best.json", {"step": step, "metric": self.metric, "metrics": metrics,
                                                         **details})  # fmt: skip
        return {f"eval_{k}": v for k, v in metrics.items()}

    def checkpoint_files(self) -> dict[str, Path]:
        # best.json is written when a score improves and the checkpoint of that step just after: an attempt
        # killed in between left a best score that no checkpoint holds. Each checkpoint keeps the best.json of
        # its step, and a resumed run takes that one back (restore_eval_records).
        return {BEST_IN_CHECKPOINT: self.eval_dir / "best.json"}

    def _load_best(self) -> float | None:
        """The best dev score of an earlier attempt of this run (resume), so 'best' survives restarts."""
        path = self.eval_dir / "best.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))["metrics"].get(self.metric)
        return None

    def describe(self) -> dict:
        return {"artifacts": self._artifacts}
