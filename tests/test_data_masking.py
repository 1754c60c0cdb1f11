"""Dynamic masking statistics on real BERT samples: rate, 80/10/10, specials, cap, whole words, greedy rule."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from data_shards import build_shards, manifest
from pipeline.data.masking import IGNORE_INDEX, MaskingRule, mask_batch
from pipeline.data.npy import npy_array
from pipeline.preprocess.samples import BERT_FIELD, npy_load
from pipeline.tokenizer.special import SPECIAL_IDS
from pipeline.tokenizer.spm import Tokenizer


@pytest.fixture(scope="session")
def bert_shards(tmp_path_factory, small_tokenizer):
    return build_shards(tmp_path_factory.getbasetemp() / "data", small_tokenizer, "bert")


@pytest.fixture(scope="module")
def batch(bert_shards):
    """All samples as one (B, 128) batch of ids and its valid-token mask."""
    rows = []
    for entry in manifest(bert_shards)["shards"]:
        for s in wds.WebDataset(str(bert_shards / entry["name"]), shardshuffle=False, nodesplitter=None):
            rows.append(npy_load(s[BERT_FIELD])[1:].astype(np.int64))
    ids = np.zeros((len(rows), 128), dtype=np.int64)
    valid = np.zeros_like(ids, dtype=bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], valid[i, : len(r)] = r, True
    return ids, valid


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    return Tokenizer(small_tokenizer)


def rule(tok: Tokenizer, whole_word=False, max_predictions=20, mask_prob=0.15) -> MaskingRule:
    special = tok.special_token_mask
    return MaskingRule(
        mask_prob=mask_prob,
        mask_replace_prob=0.8,
        random_replace_prob=0.1,
        max_predictions=max_predictions,
        mask_id=SPECIAL_IDS.mask,
        special=special,
        replacement_ids=np.flatnonzero(~special),
        word_start=tok.word_start if whole_word else None,
    )


def budgets(ids, valid, r: MaskingRule) -> np.ndarray:
    n = (valid & ~r.special[ids]).sum(1)
    return np.minimum(r.max_predictions, np.maximum(1, np.rint(n * r.mask_prob))).astype(int)


def test_rate_replacement_shares_and_never_specials(batch, tokenizer):
    ids, valid = batch
    r = rule(tokenizer)
    inputs, labels = mask_batch(ids, valid, r, np.random.default_rng(0))
    predicted = labels != IGNORE_INDEX
    candidates = valid & ~r.special[ids]
    assert len(ids) > 3000
    # Exactly the budget per sequence, hence ~15% of the non-special tokens overall.
    assert np.array_equal(predicted.sum(1), budgets(ids, valid, r))
    assert predicted.sum() / candidates.sum() == pytest.approx(0.15, abs=0.005)
    assert np.array_equal(labels[predicted], ids[predicted])
    assert not (predicted & ~candidates).any()  # never a special token or padding
    assert np.array_equal(inputs[~predicted], ids[~predicted])  # nothing else changes
    n = predicted.sum()
    to_mask = (inputs == SPECIAL_IDS.mask) & predicted
    changed = predicted & ~to_mask & (inputs != ids)
    kept = predicted & (inputs == ids)
    assert to_mask.sum() / n == pytest.approx(0.8, abs=0.01)
    assert changed.sum() / n == pytest.approx(0.1 * (1 - 1 / len(r.replacement_ids)), abs=0.01)
    assert kept.sum() / n == pytest.approx(0.1, abs=0.01)
    assert not r.special[inputs[changed]].any()  # random replacements are ordinary tokens
    # The positions are spread over the sequence, not bunched at its start.
    first_half = predicted[:, :60].sum() / candidates[:, :60].sum()
    second_half = predicted[:, 60:].sum() / candidates[:, 60:].sum()
    assert first_half == pytest.approx(second_half, rel=0.1)


def test_cap_on_predictions_per_sequence(batch, tokenizer):
    ids, valid = batch
    r = rule(tokenizer, max_predictions=5)
    _, labels = mask_batch(ids, valid, r, np.random.default_rng(1))
    counts = (labels != IGNORE_INDEX).sum(1)
    assert counts.max() == 5 and np.array_equal(counts, budgets(ids, valid, r))


def words_of(row_ids, row_valid, r: MaskingRule) -> list[list[int]]:
    """A row's words by the plain sequential rule (the reference for the vectorised one)."""
    words: list[list[int]] = []
    prev_candidate = False
    for i, (tok, ok) in enumerate(zip(row_ids, row_valid, strict=True)):
        candidate = bool(ok and not r.special[tok])
        if candidate and prev_candidate and not r.word_start[tok]:
            words[-1].append(i)
        elif candidate:
            words.append([i])
        prev_candidate = candidate
    return words


def test_whole_word_masking_takes_whole_words_greedily(batch, tokenizer):
    ids, valid = batch
    r = rule(tokenizer, whole_word=True)
    _, labels = mask_batch(ids, valid, r, np.random.default_rng(2))
    predicted = labels != IGNORE_INDEX
    budget = budgets(ids, valid, r)
    multi_piece_taken = 0
    for row in range(0, len(ids), 7):
        words = words_of(ids[row], valid[row], r)
        taken = [w for w in words if predicted[row, w].any()]
        assert all(predicted[row, w].all() for w in taken)  # never part of a word
        count = sum(len(w) for w in taken)
        assert count == predicted[row].sum() <= budget[row]
        # The greedy rule: a word left out did not fit in what remained of the budget (which only shrinks).
        assert all(len(w) > budget[row] - count for w in words if w not in taken)
        multi_piece_taken += sum(len(w) > 1 for w in taken)
    assert multi_piece_taken > 100  # the property is exercised on words of several pieces
    rate = predicted.sum() / (valid & ~r.special[ids]).sum()
    assert rate == pytest.approx(0.15, abs=0.005)  # the budget is met up to a word


def test_same_generator_same_masks(batch, tokenizer):
    ids, valid = batch
    r = rule(tokenizer, whole_word=True)
    a = mask_batch(ids[:64], valid[:64], r, np.random.default_rng(5))
    b = mask_batch(ids[:64], valid[:64], r, np.random.default_rng(5))
    c = mask_batch(ids[:64], valid[:64], r, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_rows_without_candidates_predict_nothing(tokenizer):
    r = rule(tokenizer)
    ids = np.array([[SPECIAL_IDS.cls, SPECIAL_IDS.sep, SPECIAL_IDS.sep, 0], [2, 100, 3, 0]])
    valid = np.array([[True, True, True, False], [True, True, True, False]])
    inputs, labels = mask_batch(ids, valid, r, np.random.default_rng(0))
    assert (labels[0] == IGNORE_INDEX).all() and np.array_equal(inputs[0], ids[0])
    assert labels[1].tolist() == [IGNORE_INDEX, 100, IGNORE_INDEX, IGNORE_INDEX]


def test_fast_npy_decoding_matches_numpy(tmp_path):
    import io

    for arr in [np.arange(7, dtype=np.uint16), np.arange(300, dtype=np.uint32), np.zeros((2, 5), dtype=np.int32)]:
        buf = io.BytesIO()
        np.save(buf, arr)
        for _ in range(2):  # parsed, then from the header cache
            out = npy_array(buf.getvalue())
            assert out.dtype == arr.dtype and np.array_equal(out, arr)
    with pytest.raises(ValueError):
        npy_array(b"not an array")
    with pytest.raises(ValueError):
        npy_array(buf.getvalue()[:-4])  # truncated data
