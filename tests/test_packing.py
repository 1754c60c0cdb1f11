"""Packed BERT batches: the layout, per-pair losses equal to unpacked ones, every pair once, exact resume."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from conftest import DEMO_CORPUS, run_cli_in_process
from test_data_loader import assert_same_batches, epoch_keys, make_loader
from test_model import tiny
from train_helpers import assert_same_losses, kill_group, losses, start_train, train_args, wait_for

from data_shards import build_shards, keys_by_shard
from pipeline.data.masking import IGNORE_INDEX
from pipeline.data.packing import PACKED_KEYS, first_fit_decreasing, pack_batch
from pipeline.errors import UserError
from pipeline.finetune.heads import FinetuneModel
from pipeline.finetune.inputs import InputFormat
from pipeline.finetune.problems import ClassificationProblem
from pipeline.finetune.task import check_packing, pack_features
from pipeline.model import build_model
from pipeline.preprocess.samples import parse_bert
from pipeline.tokenizer.special import SPECIAL_IDS


def short_documents(root: Path, num_docs: int = 1500) -> Path:
    """Documents of two or three sentences cut from the bundled speeches: pairs much shorter than seq_len."""
    path = root / "short-docs.jsonl"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as src:
            text = " ".join(json.loads(line)["text"] for _, line in zip(range(6), src, strict=False))
        sentences = [s.strip() + "." for s in text.split(". ") if len(s.split()) > 3]
        docs, i = [], 0
        while len(docs) < num_docs and i + 3 <= len(sentences):
            n = 2 + len(docs) % 2
            docs.append(" ".join(sentences[i : i + n]))
            i += n
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def bert_shards(tmp_path_factory, small_tokenizer):
    """Pairs of short documents at seq 256: the case packing is for."""
    root = tmp_path_factory.getbasetemp() / "data"
    overrides = {"input.paths": [str(short_documents(root))], "output.samples_per_shard": 100, "data.seq_len": 256}
    return build_shards(root, small_tokenizer, "bert-short-docs", **overrides)


def test_first_fit_decreasing_fills_rows_without_overlap():
    lengths = np.random.default_rng(0).integers(1, 60, size=200)
    row, offset, num_rows = first_fit_decreasing(lengths, 128)
    used = np.zeros((num_rows, 128), dtype=int)
    for r, o, n in zip(row, offset, lengths, strict=True):
        used[r, o : o + n] += 1
    assert used.max() == 1 and used.sum() == lengths.sum()  # every token placed once, nothing overlaps
    assert num_rows <= -(-lengths.sum() // 128) + 1  # first-fit decreasing is within a row of the bound here
    with pytest.raises(ValueError, match="within"):
        first_fit_decreasing(np.array([129]), 128)


def unpack(packed: dict, lengths: np.ndarray, key: str) -> np.ndarray:
    """Row i of the unpacked layout of ``packed[key]``, from each pair's flat start (cls_index)."""
    flat = packed[key].reshape(-1)
    return [flat[start : start + n] for start, n in zip(packed["cls_index"], lengths, strict=True)]


def test_pack_batch_is_a_layout_of_the_same_batch():
    rng = np.random.default_rng(1)
    N, T = 9, 16
    lengths = rng.integers(2, T + 1, size=N)
    mask = (np.arange(T) < lengths[:, None]).astype(np.int64)
    batch = {
        "input_ids": np.where(mask, rng.integers(10, 99, size=(N, T)), 0),
        "attention_mask": mask,
        "nsp_labels": rng.integers(0, 2, size=N),
    }
    for pad_to in ("seq_len", "batch"):
        packed = pack_batch(batch, T, {"input_ids": 0, "attention_mask": 0}, pad_to)
        R, width = packed["input_ids"].shape
        assert R < N and (width == T if pad_to == "seq_len" else width <= T and width % 8 == 0)
        assert packed["attention_mask"].sum() == lengths.sum()
        for i, (ids, pos) in enumerate(
            zip(unpack(packed, lengths, "input_ids"), unpack(packed, lengths, "position_ids"), strict=True)
        ):
            assert (ids == batch["input_ids"][i, : lengths[i]]).all() and (pos == np.arange(lengths[i])).all()
        seq = packed["sequence_ids"]
        assert ((seq > 0) == (packed["attention_mask"] > 0)).all()
        ids_in_row = {}  # one sequence id per pair, distinct within a row
        for i, start in enumerate(packed["cls_index"]):
            ids_of_pair = set(seq.reshape(-1)[start : start + lengths[i]])
            assert len(ids_of_pair) == 1
            ids_in_row.setdefault(start // width, []).append(ids_of_pair.pop())
        assert all(len(ids) == len(set(ids)) for ids in ids_in_row.values())
        assert (packed["nsp_labels"] == batch["nsp_labels"]).all()
        cu = packed["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == R * width and (np.diff(cu) > 0).all()
        assert set(packed["cls_index"]) <= set(cu)  # every pair starts a run


def test_packed_attention_on_cpu_is_the_block_diagonal_mask_and_says_why_not_varlen(caplog):
    from pipeline.model import attention

    seq = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    layout = attention.PackedLayout.from_sequence_ids(seq, torch.tensor([0, 2, 5, 6, 12]), 6)
    assert layout.mask[0, 0].tolist()[1] == [True, True, False, False, False, False]  # never across pairs
    assert layout.mask[0, 0].tolist()[5] == [False] * 5 + [True]  # padding sees padding only: no NaN row
    q, k, v = torch.randn(3, 2, 2, 6, 4).unbind(0)
    out = attention.packed_attention(q, k, v, layout, 0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask))
    # Attention of the first pair alone: the second pair and the padding change nothing.
    alone = F.scaled_dot_product_attention(q[:1, :, :2], k[:1, :, :2], v[:1, :, :2])
    torch.testing.assert_close(out[:1, :, :2], alone)
    # Why a GPU would fall back to the mask: each reason is named.
    if attention.varlen_attn is None:
        assert "has no torch.nn.attention.varlen" in attention._varlen_unusable(q.bfloat16(), layout, 0.0)
        return
    assert "dropout" in attention._varlen_unusable(q.bfloat16(), layout, 0.1)
    assert "fp16/bf16" in attention._varlen_unusable(q, layout, 0.0)
    assert "cu_seqlens" in attention._varlen_unusable(q, attention.PackedLayout(layout.mask), 0.0)
    assert attention._varlen_unusable(q.bfloat16(), layout, 0.0) is None


def per_pair_losses(model, batch: dict, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLM loss of each pair (mean over its predicted tokens), NSP loss of each pair), from full logits."""
    keys = ("input_ids", "token_type_ids", "attention_mask", "position_ids", "sequence_ids", "cls_index")
    out = model(**{k: batch[k] for k in keys if k in batch})
    labels = batch["mlm_labels"]
    R, T = labels.shape
    if "cls_index" in batch:  # which pair each flat position belongs to
        pair_of = torch.full((R * T,), -1)
        for p, start in enumerate(batch["cls_index"].tolist()):
            row = batch["sequence_ids"][start // T]
            n = int((row == row[start % T]).sum())  # the pair's tokens: its sequence id within its row
            pair_of[start : start + n] = p
        assert (pair_of >= 0).sum() == batch["attention_mask"].sum()
    else:
        pair_of = torch.arange(R).repeat_interleave(T)
    token_loss = F.cross_entropy(out.mlm_logits.reshape(R * T, -1), labels.reshape(-1), reduction="none",
                                 ignore_index=IGNORE_INDEX)  # fmt: skip
    predicted = labels.reshape(-1) != IGNORE_INDEX
    sums = torch.zeros(num_pairs).index_add_(0, pair_of[predicted], token_loss[predicted])
    counts = torch.zeros(num_pairs).index_add_(0, pair_of[predicted], torch.ones(int(predicted.sum())))
    nsp = F.cross_entropy(out.nsp_logits, batch["nsp_labels"], reduction="none")
    return sums / counts, nsp


@pytest.mark.parametrize("pre_layernorm", [False, True])
def test_packed_batch_gives_each_pair_its_unpacked_losses(bert_shards, pre_layernorm):
    unpacked = next(iter(make_loader(bert_shards, micro_batch_size=24, num_workers=0)))
    packed = next(iter(make_loader(bert_shards, micro_batch_size=24, num_workers=0, packing=True)))
    N = len(unpacked["nsp_labels"])
    assert len(packed["nsp_labels"]) == N and len(packed["input_ids"]) < N  # the same pairs in fewer rows
    assert packed["attention_mask"].sum() == unpacked["attention_mask"].sum()
    torch.manual_seed(0)
    model = build_model(tiny(vocab_size=2000, max_position_embeddings=256, pre_layernorm=pre_layernorm)).eval()
    with torch.no_grad():
        mlm_u, nsp_u = per_pair_losses(model, unpacked, N)
        mlm_p, nsp_p = per_pair_losses(model, packed, N)
        torch.testing.assert_close(mlm_p, mlm_u, rtol=0, atol=1e-5)
        torch.testing.assert_close(nsp_p, nsp_u, rtol=0, atol=1e-5)
        # The training path (MLM at the masked positions only, NSP averaged over pairs) gives the batch's losses.
        common = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels")
        out_u = model(**{k: unpacked[k] for k in common})
        out_p = model(**{k: packed[k] for k in (*common, "position_ids", "sequence_ids", "cls_index")})
    assert out_p.nsp_count == N and out_p.mlm_count == out_u.mlm_count
    torch.testing.assert_close(out_p.mlm_loss, out_u.mlm_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_p.nsp_loss, out_u.nsp_loss, rtol=0, atol=1e-5)


def test_every_pair_once_per_epoch_across_two_ranks_and_two_workers_when_packed(bert_shards):
    by_shard = keys_by_shard(bert_shards)
    tokens_of = {}  # key -> the pair's tokens, [CLS] A [SEP] B [SEP], from the shards
    for name in by_shard:
        for sample in wds.WebDataset(str(bert_shards / name), shardshuffle=False, empty_check=False):
            tokens_of[sample["__key__"]] = parse_bert(sample, SPECIAL_IDS.sep)["input_ids"]
    loaders = [make_loader(bert_shards, rank=r, world_size=2, packing=True) for r in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch
    seen = []
    for loader in loaders:
        count = 0
        for batch in loader.iterate(0):
            keys = loader.last_keys
            count += 1
            assert len(batch["nsp_labels"]) == len(keys) == 16
            lengths = np.array([len(tokens_of[k]) for k in keys])
            assert int(batch["attention_mask"].sum()) == lengths.sum()
            # Each pair's unmasked tokens are where cls_index says, in its own sequence.
            ids = batch["input_ids"].reshape(-1).numpy()
            labels = batch["mlm_labels"].reshape(-1).numpy()
            for key, start, n in zip(keys, batch["cls_index"].tolist(), lengths, strict=True):
                original = np.where(labels[start : start + n] >= 0, labels[start : start + n], ids[start : start + n])
                assert (original == tokens_of[key]).all()
            seen.extend(keys)
        assert count == loader.batches_per_epoch
    assert len(seen) == len(set(seen)) == loaders[0].samples_per_epoch  # every pair once


def test_packed_resume_mid_epoch_is_bitwise_identical(bert_shards):
    loader = make_loader(bert_shards, micro_batch_size=8, shuffle_window=100, packing=True)
    full = list(loader.iterate(0))
    for start in (1, 26, len(full) - 3):
        resumed = list(make_loader(bert_shards, 8, shuffle_window=100, packing=True).iterate(0, start))
        assert_same_batches(resumed, full[start:])
    # The same pairs in the same order as unpacked: packing is a layout, not another data order.
    assert (
        epoch_keys(make_loader(bert_shards, 8, shuffle_window=100, packing=True), 0)[:5]
        == epoch_keys(make_loader(bert_shards, 8, shuffle_window=100), 0)[:5]
    )


def test_packing_gpt_blocks_is_refused(tmp_path_factory, small_tokenizer):
    shards = build_shards(
        tmp_path_factory.getbasetemp() / "data", small_tokenizer, "gpt", **{"data.objective": "gpt", "data.seq_len": 64}
    )
    with pytest.raises(UserError, match="packing is for BERT"):
        make_loader(shards, packing=True)


# ---------------------------------------------------------------------------------------------------------
# Training with packed batches

NO_DROPOUT = ["--model.hidden_dropout", "0", "--model.attention_dropout", "0"]


def packed_train_args(shards, out, *extra):
    return train_args(shards, out, "--train.max_steps", "8", "--checkpoint.every_steps", "4",
                      "--model.max_position_embeddings", "256", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, bert_shards, process_group):
    out = tmp_path_factory.mktemp("packed") / "run"
    proc = run_cli_in_process(*packed_train_args(bert_shards, out, "--data.packing", "true"), env=process_group.env)
    return out, proc


@pytest.mark.slow  # three short CLI runs (~1-2 min on a loaded 2-core machine)
def test_packed_pretraining_follows_the_unpacked_run(packed_run, bert_shards, tmp_path, process_group):
    """Without dropout, a packed run is the unpacked run computed on fewer rows: the same losses, step by step."""
    runs = {}
    for packing in ("true", "false"):
        out = tmp_path / f"packing-{packing}"
        run_cli_in_process(*packed_train_args(bert_shards, out, "--data.packing", packing, *NO_DROPOUT),
                           env=process_group.env)  # fmt: skip
        runs[packing] = losses(out)
    assert list(runs["true"]) == list(range(1, 9))
    for step, loss in runs["false"].items():
        assert runs["true"][step] == pytest.approx(loss, rel=1e-4), step
    summary = json.loads(packed_run[1].stdout.strip().splitlines()[-1])
    assert summary["samples"] == 16 * 8  # pairs, not rows


@pytest.mark.slow  # a killed process and its resume
def test_killed_packed_run_resumes_to_the_same_losses(packed_run, bert_shards, tmp_path, process_group):
    ref, _ = packed_run
    out = tmp_path / "killed"
    args = packed_train_args(bert_shards, out, "--data.packing", "true")
    proc = start_train(args, tmp_path / "first.log")
    wait_for(out / "checkpoints" / "step_00000004" / "checkpoint.json", proc)
    kill_group(proc)
    assert 4 <= max(losses(out)) < 8, "the run must have been killed part-way"
    run_cli_in_process(*args, env=process_group.env)
    assert_same_losses(losses(out), losses(ref))  # same data, masks, dropout and optimizer state


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning: sentence and pair classification


@pytest.mark.parametrize("kind", ["classification", "pair_classification"])
def test_packed_finetuning_batch_gives_each_example_its_unpacked_logits_and_loss(kind):
    rng = np.random.default_rng(3)
    fmt = InputFormat("bert", 128)
    features = []
    for _ in range(20):  # short texts (5-25 pieces), as in sentence classification
        a = rng.integers(9, 300, size=rng.integers(5, 26)).tolist()
        b = rng.integers(9, 300, size=rng.integers(5, 26)).tolist()
        features.append((fmt.pair(a, b) if kind == "pair_classification" else fmt.single(a), int(rng.integers(3))))
    problem = ClassificationProblem.__new__(ClassificationProblem)  # collate and loss need no tokenizer
    unpacked = ClassificationProblem.collate(problem, features)
    packed = pack_features(unpacked, 128)
    assert len(packed["input_ids"]) < len(features) // 2 and packed["attention_mask"].sum() == sum(
        len(f[0].input_ids) for f in features
    )
    torch.manual_seed(0)
    model = FinetuneModel(tiny(vocab_size=300, max_position_embeddings=128), "classify", num_labels=3).eval()
    keys = ("input_ids", "token_type_ids", "attention_mask", "summary_index", *PACKED_KEYS)
    with torch.no_grad():
        out_u = model(**{k: unpacked[k] for k in keys if k in unpacked})
        out_p = model(**{k: packed[k] for k in keys if k in packed})
    torch.testing.assert_close(out_p.logits, out_u.logits, rtol=0, atol=1e-5)
    loss_u, _ = ClassificationProblem.loss(problem, out_u, unpacked)
    loss_p, sums = ClassificationProblem.loss(problem, out_p, packed)
    torch.testing.assert_close(loss_p, loss_u, rtol=0, atol=1e-5)
    assert sums["task_count"] == len(features)


def test_finetune_packing_is_refused_where_it_is_not_exact():
    from pipeline.config import build_config
    from pipeline.finetune.config import FinetuneJobConfig

    def cfg(**values):
        return build_config(FinetuneJobConfig, None, {"finetune.packing": True, **values})

    check_packing(cfg(**{"task.kind": "classification", "task.labels": ["a", "b"]}), "bert")
    for values, arch, message in [
        ({"task.kind": "squad"}, "bert", "classification only"),
        ({"task.kind": "classification", "task.labels": ["a", "b"]}, "gpt", "classification only"),
        ({"task.kind": "classification", "task.labels": ["a", "b"], "finetune.pooling": "mean"}, "bert", "[CLS]"),
    ]:
        with pytest.raises(UserError, match=message):
            check_packing(cfg(**values), arch)
