"""Pre-training as a ``Task`` of the shared loop: BERT (masked LM + next sentence) or GPT (causal LM)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from pipeline.data.loader import PretrainLoader
from pipeline.data.packing import PACKED_KEYS, max_seqlen
from pipeline.data.shards import ShardSet
from pipeline.errors import UserError
from pipeline.model.builder import build_model
from pipeline.model.config import ModelConfig
from pipeline.model.flops import flops_per_token
from pipeline.train.loop import StepOutput, host_max_labels, host_padding


class PretrainTask:
    def __init__(
        self,
        model_cfg: ModelConfig,
        loader: PretrainLoader,
        shard_set: ShardSet,
        device: torch.device,
        nsp_weight: float = 1.0,
    ):
        self.model_cfg = model_cfg
        self.nsp_weight = nsp_weight
        self.loader = loader
        self.shard_set = shard_set
        self.device = device
        self.objective = model_cfg.arch
        self.name = f"pretrain-{self.objective}"
        self.batches_per_epoch = loader.batches_per_epoch
        self._damage_reported = (0, 0)  # the loader's counts already handed to the loop

    def build_model(self) -> nn.Module:
        return build_model(self.model_cfg)

    def lr_scale(self) -> dict[str, float] | None:
        return None

    def data_layout(self) -> dict:
        return self.loader.layout()

    def batches(self, epoch: int, start_batch: int, history: list[dict] = ()) -> Iterator[dict]:
        yield from self.loader.iterate(epoch, start_batch, history)

    def forward(self, model: nn.Module, batch: dict) -> StepOutput:
        # What shapes the step (padding, labelled positions) is read from the host copy: no device sync.
        tokens, padded = host_padding(batch["attention_mask"])
        max_labels = host_max_labels(batch["mlm_labels" if self.objective == "bert" else "labels"])
        packed = {}
        if "sequence_ids" in batch:  # several pairs per row (data.packing): the varlen kernel's longest run
            packed["max_seqlen"] = max_seqlen(batch["cu_seqlens"].numpy())
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        attention_mask = batch["attention_mask"] if padded else None  # None: SDPA may use its fastest kernel
        if self.objective == "bert":
            if packed:
                packed.update({k: batch[k] for k in PACKED_KEYS})
            out = model(
                batch["input_ids"],
                token_type_ids=batch["token_type_ids"],
                attention_mask=attention_mask,
                mlm_labels=batch["mlm_labels"],
                nsp_labels=batch["nsp_labels"],
                max_predictions=max_labels,
                **packed,
            )
            sums = {
                "mlm_loss_sum": out.mlm_loss.detach() * out.mlm_count,
                "mlm_correct": out.mlm_correct,
                "mlm_count": out.mlm_count,
                "nsp_loss_sum": out.nsp_loss.detach() * out.nsp_count,
                "nsp_correct": out.nsp_correct,
                "nsp_count": out.nsp_count,
            }
            loss = out.loss if self.nsp_weight == 1.0 else out.mlm_loss + self.nsp_weight * out.nsp_loss
        else:
            out = model(batch["input_ids"], attention_mask=attention_mask, labels=batch["labels"],
                        max_labels_per_row=max_labels)  # fmt: skip
            sums = {"lm_loss_sum": out.loss.detach() * out.count, "lm_correct": out.correct, "lm_count": out.count}
            loss = out.loss
        return StepOutput(loss=loss, sums=sums, tokens=tokens, samples=len(batch["nsp_labels"]) if packed else None,
                          data_damage=self._new_damage())  # fmt: skip

    def _new_damage(self) -> tuple[int, int]:
        """Read errors and substituted samples the loader met since the previous micro-batch (this rank)."""
        stats = self.loader.stats
        now = (stats["read_errors"], stats["samples_substituted"])
        new = (now[0] - self._damage_reported[0], now[1] - self._damage_reported[1])
        self._damage_reported = now
        return new

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        def ratio(a: str, b: str) -> float | None:
            return sums[a] / sums[b] if sums.get(b) else None

        if self.objective == "bert":
            return {
                "mlm_loss": ratio("mlm_loss_sum", "mlm_count"),
                "mlm_acc": ratio("mlm_correct", "mlm_count"),
                "nsp_loss": ratio("nsp_loss_sum", "nsp_count"),
                "nsp_acc": ratio("nsp_correct", "nsp_count"),
            }
        return {"lm_loss": ratio("lm_loss_sum", "lm_count"), "lm_acc": ratio("lm_correct", "lm_count")}

    def flops_per_token(self) -> float:
        return flops_per_token(self.model_cfg, self.loader.seq_len, mlm_fraction=self.loader.cfg.mask_prob)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float] | None:
        return None

    def describe(self) -> dict:
        return {"artifacts": [str(Path(self.shard_set.directory) / "manifest.json")]}

    def checkpoint_files(self) -> dict[str, Path]:
        return {}


def model_config_for_shards(model_cfg: ModelConfig, shard_set: ShardSet) -> ModelConfig:
    """The model config with the tokenizer's vocabulary, checked against what the shards hold."""
    if model_cfg.arch != shard_set.objective:
        raise UserError(f"model.arch {model_cfg.arch!r} does not match the shards' objective {shard_set.objective!r}")
    if model_cfg.max_position_embeddings < shard_set.seq_len:
        raise UserError(
            f"model.max_position_embeddings {model_cfg.max_position_embeddings} is less than the shards' seq_len "
            f"{shard_set.seq_len}"
        )
    return replace(model_cfg, vocab_size=shard_set.vocab_size)
