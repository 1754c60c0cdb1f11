"""Tests that watch a model learn, so that a BERT (or GPT) that cannot learn fails here, in seconds, in-process.

The loss of a model that learns nothing stays at the uniform level (ln V for the tokens, ln 2 for NSP); one that
learns only token frequencies stops at the unigram entropy of its targets. Memorising one fixed batch must go far
below that: every head, the embeddings (tied to the MLM decoder), attention and the optimizer have to work.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_shards import build_shards
from pipeline.data.config import DataConfig
from pipeline.data.loader import PretrainLoader
from pipeline.model.builder import build_model
from pipeline.model.config import load_model_preset
from pipeline.train.lamb import Lamb


def unigram_entropy(targets: torch.Tensor) -> float:
    """Entropy (nats) of the targets' own frequency distribution: the best loss without context."""
    _, counts = torch.unique(targets, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log()).sum())


def one_batch(shards, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """The first batch of the real loader (dynamic masks drawn once, then fixed)."""
    cfg = DataConfig(shards=str(shards), num_workers=0)
    batch = next(iter(PretrainLoader(cfg, micro_batch_size=batch_size, seed=7).iterate(0, 0)))
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def overfit(model, batch: dict, forward, steps: int, lr: float) -> list[tuple[float, object]]:
    """``steps`` LAMB steps on the same batch; returns (loss, output) after each."""
    torch.manual_seed(0)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = Lamb([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    history = []
    for step in range(steps):
        lr_now = lr * min(1.0, (step + 1) / 20)  # a short warmup, as every recipe has
        for group in opt.param_groups:
            group["lr"] = lr_now
        out = forward(model, batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append((float(out.loss.detach()), out))
    return history


@pytest.fixture(scope="session")
def bert_shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.getbasetemp() / "data", small_tokenizer, "bert-64", **{"data.seq_len": 64})


@pytest.fixture(scope="session")
def gpt_shards(tmp_path_factory, small_tokenizer):
    return build_shards(
        tmp_path_factory.getbasetemp() / "data", small_tokenizer, "gpt", **{"data.objective": "gpt", "data.seq_len": 64}
    )


@pytest.fixture(scope="module")
def bert_batch(bert_shards):
    return one_batch(bert_shards)


def test_bert_memorises_one_batch_far_below_the_unigram_plateau(bert_batch):
    vocab = 2000
    model_cfg = load_model_preset("debug", {"vocab_size": vocab, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(model_cfg)
    labels = bert_batch["mlm_labels"]
    plateau = unigram_entropy(labels[labels >= 0])  # ~4.3 nats for the ~150 masked tokens of real text

    def forward(m, b):
        return m(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["mlm_labels"], b["nsp_labels"])

    history = overfit(model, bert_batch, forward, steps=150, lr=0.02)
    first, (last, out) = history[0][0], history[-1]
    assert first == pytest.approx(math.log(vocab) + math.log(2), abs=0.3)  # starts uniform
    mlm_loss = float(out.mlm_loss.detach())
    assert mlm_loss < 0.1 * plateau, (mlm_loss, plateau)
    assert int(out.mlm_correct) == int(out.mlm_count)  # every masked token recalled
    assert int(out.nsp_correct) == int(out.nsp_count)  # every IsNext / NotNext label recalled
    assert last < 0.1 * (plateau + math.log(2))


def test_gpt_memorises_one_batch_far_below_the_unigram_plateau(gpt_shards):
    vocab = 2000
    batch = one_batch(gpt_shards)
    model_cfg = load_model_preset(
        "debug", {"arch": "gpt", "vocab_size": vocab, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    )
    torch.manual_seed(0)
    model = build_model(model_cfg)
    plateau = unigram_entropy(batch["labels"][batch["attention_mask"].bool()])

    def forward(m, b):
        return m(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])

    history = overfit(model, batch, forward, steps=150, lr=0.02)
    assert history[0][0] == pytest.approx(math.log(vocab), abs=0.3)
    assert history[-1][0] < 0.1 * plateau, (history[-1][0], plateau)


def test_a_model_that_does_not_update_stays_on_the_plateau(bert_batch):
    """The check above is not vacuous: with a zero learning rate the same loop ends where it started."""
    model_cfg = load_model_preset("debug", {"vocab_size": 2000, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(model_cfg)

    def forward(m, b):
        return m(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["mlm_labels"], b["nsp_labels"])

    history = overfit(model, bert_batch, forward, steps=5, lr=0.0)
    labels = bert_batch["mlm_labels"]
    assert history[-1][0] == pytest.approx(history[0][0])
    assert float(history[-1][1].mlm_loss.detach()) > unigram_entropy(labels[labels >= 0])


def test_unigram_entropy_of_a_known_distribution():
    targets = torch.tensor([1, 1, 2, 3])  # p = 1/2, 1/4, 1/4
    assert unigram_entropy(targets) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy(torch.tensor(np.zeros(5, dtype=np.int64))) == 0.0


def test_objective_nsp_weight_scales_the_next_sentence_loss(bert_shards):
    """objective.nsp_weight: 0 trains masked LM only (the NSP head gets no gradient), 1 is the paper's sum."""
    from pipeline.train.pretrain import PretrainTask

    loader = PretrainLoader(DataConfig(shards=str(bert_shards), num_workers=0), micro_batch_size=8, seed=7)
    batch = next(iter(loader.iterate(0, 0)))
    model_cfg = load_model_preset("debug", {"vocab_size": 2000, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(model_cfg)
    losses = {}
    for weight in (1.0, 0.5, 0.0):
        task = PretrainTask(model_cfg, loader, loader.shard_set, torch.device("cpu"), nsp_weight=weight)
        model.zero_grad(set_to_none=True)
        step = task.forward(model, batch)
        step.loss.backward()
        nsp_grad = model.nsp_head.weight.grad
        losses[weight] = (float(step.loss.detach()), nsp_grad is not None and bool(nsp_grad.abs().sum() > 0))
    mlm = float(step.sums["mlm_loss_sum"] / step.sums["mlm_count"])
    nsp = float(step.sums["nsp_loss_sum"] / step.sums["nsp_count"])
    assert losses[1.0][0] == pytest.approx(mlm + nsp, rel=1e-5) and losses[1.0][1]
    assert losses[0.5][0] == pytest.approx(mlm + 0.5 * nsp, rel=1e-5) and losses[0.5][1]
    assert losses[0.0][0] == pytest.approx(mlm, rel=1e-5) and not losses[0.0][1]
