"""BERT pair creation against the original algorithm's rules, on synthetic documents whose tokens say
which document and sentence they come from."""

from __future__ import annotations

import random

import numpy as np

from pipeline.preprocess.bert_pairs import create_unit_instances, truncate_pair
from pipeline.preprocess.static_masking import mask_sequence


def original_truncate(tokens_a, tokens_b, max_num_tokens, rng):
    """create_pretraining_data.truncate_seq_pair, verbatim in behaviour."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()


def test_fast_truncation_equals_the_original_draw_for_draw():
    gen = random.Random(0)
    for trial in range(500):
        a = list(range(gen.randint(1, 200)))
        b = list(range(1000, 1000 + gen.randint(1, 200)))
        limit = gen.randint(2, 300)
        a2, b2 = list(a), list(b)
        original_rng, rng = random.Random(trial), random.Random(trial)
        original_truncate(a, b, limit, original_rng)
        truncate_pair(a2, b2, limit, rng)
        assert (a, b) == (a2, b2)
        # The same number of draws, so every later random choice of the unit stays the original's.
        assert rng.random() == original_rng.random()


def synthetic_unit(num_docs=30, seed=1):
    """Token = doc * 100_000 + sentence * 100 + position: every token knows where it came from."""
    gen = random.Random(seed)
    docs = []
    for d in range(num_docs):
        sentences = []
        for s in range(1 if d % 10 == 0 else gen.randint(3, 40)):
            sentences.append([d * 100_000 + s * 100 + k for k in range(gen.randint(3, 40))])
        docs.append(sentences)
    return docs


def test_pairs_follow_the_original_rules():
    docs = synthetic_unit()
    seq_len = 64
    stats: dict = {}
    instances, order = create_unit_instances(docs, seq_len, 0.1, 0.5, 2, random.Random(5), stats)
    assert instances
    shuffled = [docs[k] for k in order]
    nsp = np.array([i.is_random_next for i in instances])
    assert 0.4 < nsp.mean() < 0.62, nsp.mean()
    contiguous = 0
    for inst in instances:
        a, b = inst.tokens_a, inst.tokens_b
        assert a and b and len(a) + len(b) <= seq_len - 3
        doc_a = {t // 100_000 for t in a}
        assert doc_a == {order[inst.doc]}  # A comes from its own document only
        if inst.is_random_next:
            assert {t // 100_000 for t in b} == {order[inst.random_doc]} != doc_a
        else:
            assert {t // 100_000 for t in b} == doc_a
            # B continues A: the first sentence of B comes after A's last sentence.
            assert (b[0] % 100_000) // 100 > (a[-1] % 100_000) // 100
            if (b[0] % 100) == 0 and (a[-1] % 100) == len(shuffled[inst.doc][(a[-1] % 100_000) // 100]) - 1:
                contiguous += 1
    # Single-sentence documents never start a pair of their own.
    singles = {k for k, d in enumerate(docs) if len(d) < 2}
    assert singles and not {order[i.doc] for i in instances} & singles
    assert contiguous > 0 and stats.get("truncated_pairs", 0) > 0


def test_static_masks_follow_80_10_10_and_never_touch_specials():
    vocab = 500
    special = np.zeros(vocab, dtype=bool)
    special[:9] = True
    word_start = np.ones(vocab, dtype=bool)
    rng = random.Random(0)
    masked_frac, kept, total = 0, 0, 0
    for _ in range(400):
        tokens = [
            2,
            *[rng.randint(9, vocab - 1) for _ in range(60)],
            3,
            *[rng.randint(9, vocab - 1) for _ in range(60)],
            3,
        ]
        out, positions, labels = mask_sequence(
            tokens, rng, masked_lm_prob=0.15, max_predictions=20, mask_id=4, special=special,
            word_start=word_start, whole_word=False, vocab_size=vocab, num_special=9,
        )  # fmt: skip
        assert len(positions) == min(20, round(len(tokens) * 0.15)) and positions == sorted(positions)
        assert all(not special[tokens[p]] for p in positions)
        assert [tokens[p] for p in positions] == labels
        masked_frac += sum(out[p] == 4 for p in positions)
        kept += sum(out[p] == tokens[p] for p in positions)
        total += len(positions)
        assert all(out[i] == tokens[i] for i in range(len(tokens)) if i not in positions)
    assert 0.77 < masked_frac / total < 0.83
    assert 0.08 < kept / total < 0.125  # 10% unchanged (+ random draws that hit the same id)


def test_whole_word_masking_masks_complete_words():
    vocab = 100
    special = np.zeros(vocab, dtype=bool)
    special[:9] = True
    word_start = np.zeros(vocab, dtype=bool)
    word_start[50:] = True  # ids >= 50 start words, ids 9..49 continue them
    rng = random.Random(3)
    for _ in range(200):
        tokens = [2]
        for _ in range(30):
            tokens += [rng.randint(50, 99)] + [rng.randint(9, 49) for _ in range(rng.randint(0, 2))]
        tokens.append(3)
        _, positions, _ = mask_sequence(
            tokens, rng, masked_lm_prob=0.15, max_predictions=20, mask_id=4, special=special,
            word_start=word_start, whole_word=True, vocab_size=vocab, num_special=9,
        )  # fmt: skip
        chosen = set(positions)
        for p in positions:  # every masked piece's whole word is masked
            start = p
            while not word_start[tokens[start]]:
                start -= 1
            end = p + 1
            while end < len(tokens) - 1 and not word_start[tokens[end]] and not special[tokens[end]]:
                end += 1
            assert set(range(start, end)) <= chosen
