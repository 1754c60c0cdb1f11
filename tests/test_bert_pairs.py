"""BERT pair creation against the original algorithm: a plain list-of-tokens transcription of Google's
``create_instances_from_document`` (in this file) must give exactly the pairs of the index-based implementation,
and the rules hold on synthetic documents whose tokens say which document and sentence they come from."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline.preprocess.bert_pairs import RandomNextPool, UnitTokens, create_unit_pairs, trim_counts, truncate_pair
from pipeline.preprocess.static_masking import mask_sequence


def original_trim(len_a: int, len_b: int, max_num_tokens: int) -> tuple[int, int]:
    """create_pretraining_data.truncate_seq_pair's loop, counting what it removes from each segment."""
    removed = [0, 0]
    while len_a + len_b > max_num_tokens:
        if len_a > len_b:
            len_a -= 1
            removed[0] += 1
        else:
            len_b -= 1
            removed[1] += 1
    return removed[0], removed[1]


def test_trim_counts_equal_the_original_loop():
    for len_a in range(1, 40):
        for len_b in range(1, 40):
            for limit in range(2, 80):
                assert trim_counts(len_a, len_b, limit) == original_trim(len_a, len_b, limit), (len_a, len_b, limit)


def test_truncation_cuts_front_and_back_at_random():
    rng = random.Random(0)
    fronts = total = 0
    for _ in range(2000):
        a = (100, 100 + rng.randint(1, 120))
        b = (500, 500 + rng.randint(1, 120))
        limit = rng.randint(5, 125)
        new_a, new_b, removed = truncate_pair(a, b, limit, rng)
        assert (new_a[1] - new_a[0], new_b[1] - new_b[0]) == (
            a[1] - a[0] - trim_counts(a[1] - a[0], b[1] - b[0], limit)[0],
            b[1] - b[0] - trim_counts(a[1] - a[0], b[1] - b[0], limit)[1],
        )
        assert a[0] <= new_a[0] <= new_a[1] <= a[1] and b[0] <= new_b[0] <= new_b[1] <= b[1]
        fronts += (new_a[0] - a[0]) + (new_b[0] - b[0])
        total += removed
    assert 0.47 < fronts / total < 0.53


def reference_pairs(documents, seq_len, short_seq_prob, random_next_prob, dupe_factor, rng, pool, single_sentence):
    """Google's create_instances_from_document over lists of token lists, verbatim in structure, with two
    documented changes: the random-next document comes from ``pool`` (``pool[r] = (document, unit index)``),
    and truncation draws its front-or-back coin flips per segment at once (``getrandbits``)."""
    order = list(range(len(documents)))
    rng.shuffle(order)
    shuffled = [documents[k] for k in order]
    if pool is None:
        pool = [(doc, k) for doc, k in zip(shuffled, order, strict=True)]
    instances = []
    max_num_tokens = seq_len - 3
    for _ in range(dupe_factor):
        for d, document in enumerate(shuffled):
            if len(document) < 2 and single_sentence == "random_next_only":
                continue
            target_seq_length = max_num_tokens
            if rng.random() < short_seq_prob:
                target_seq_length = rng.randint(2, max_num_tokens)
            current_chunk, current_length, i = [], 0, 0
            while i < len(document):
                segment = document[i]
                current_chunk.append(segment)
                current_length += len(segment)
                if i == len(document) - 1 or current_length >= target_seq_length:
                    a_end = 1
                    if len(current_chunk) >= 2:
                        a_end = rng.randint(1, len(current_chunk) - 1)
                    tokens_a = [t for j in range(a_end) for t in current_chunk[j]]
                    tokens_b = []
                    random_doc = -1
                    if len(current_chunk) == 1 or rng.random() < random_next_prob:
                        is_random_next = 1
                        target_b_length = target_seq_length - len(tokens_a)
                        for _ in range(10):
                            random_doc = rng.randint(0, len(pool) - 1)
                            if pool[random_doc][1] != order[d]:
                                break
                        random_document = pool[random_doc][0]
                        random_start = rng.randint(0, len(random_document) - 1)
                        for j in range(random_start, len(random_document)):
                            tokens_b.extend(random_document[j])
                            if len(tokens_b) >= target_b_length:
                                break
                        i -= len(current_chunk) - a_end
                    else:
                        is_random_next = 0
                        for j in range(a_end, len(current_chunk)):
                            tokens_b.extend(current_chunk[j])
                    remove_a, remove_b = original_trim(len(tokens_a), len(tokens_b), max_num_tokens)
                    front_a = rng.getrandbits(remove_a).bit_count()
                    front_b = rng.getrandbits(remove_b).bit_count()
                    tokens_a = tokens_a[front_a : len(tokens_a) - (remove_a - front_a)]
                    tokens_b = tokens_b[front_b : len(tokens_b) - (remove_b - front_b)]
                    instances.append((tokens_a, tokens_b, is_random_next, d, random_doc))
                    current_chunk, current_length = [], 0
                i += 1
    rng.shuffle(instances)
    return instances


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


def as_lists(tokens: UnitTokens, pairs):
    flat = tokens.flat.tolist()
    return [
        (flat[pairs.a_start[i] : pairs.a_end[i]], flat[pairs.b_start[i] : pairs.b_end[i]],
         int(pairs.is_random_next[i]), int(pairs.doc[i]), int(pairs.random_doc[i]))
        for i in range(len(pairs))
    ]  # fmt: skip


@pytest.mark.parametrize("single_sentence", ["random_next_only", "notnext_pair"])
@pytest.mark.parametrize("seed", range(4))
def test_index_pairs_equal_the_list_transcription_of_the_original(seed, single_sentence):
    gen = random.Random(seed)
    docs = synthetic_unit(num_docs=gen.randint(2, 25), seed=seed)
    seq_len = gen.choice([8, 32, 64, 128])
    short, random_next, dupe = gen.choice([0.0, 0.1, 0.5]), gen.choice([0.0, 0.5, 1.0]), gen.randint(1, 3)
    tokens = UnitTokens.from_documents(docs)
    for use_pool in (False, True):
        reference_pool, pool = None, None
        if use_pool:  # corpus scope: other documents, and an excerpt of unit document 1
            others = synthetic_unit(num_docs=6, seed=seed + 100)
            pool_docs = [[[t + 50_000_000 for t in s] for s in doc] for doc in others] + [docs[1][1:] or docs[1]]
            unit_index = [-1] * len(others) + [1]
            reference_pool = list(zip(pool_docs, unit_index, strict=True))
            tokens = UnitTokens.from_documents(docs + pool_docs)
            tokens.doc_sentences = tokens.doc_sentences[: len(docs) + 1]
            starts = [tokens.doc_sentences[-1]]
            for doc in pool_docs:
                starts.append(starts[-1] + len(doc))
            pool = RandomNextPool(starts[:-1], starts[1:], unit_index, [1] * len(pool_docs))
        args = (seq_len, short, random_next, dupe)
        expected = reference_pairs(docs, *args, random.Random(seed), reference_pool, single_sentence)
        pairs, _ = create_unit_pairs(tokens, *args, random.Random(seed), {}, pool=pool, single_sentence=single_sentence)
        assert as_lists(tokens, pairs) == expected


def test_pairs_follow_the_original_rules():
    docs = synthetic_unit()
    seq_len = 64
    stats: dict = {}
    tokens = UnitTokens.from_documents(docs)
    pairs, order = create_unit_pairs(tokens, seq_len, 0.1, 0.5, 2, random.Random(5), stats)
    instances = as_lists(tokens, pairs)
    assert instances
    shuffled = [docs[k] for k in order]
    nsp = np.array([i[2] for i in instances])
    assert 0.4 < nsp.mean() < 0.62, nsp.mean()
    contiguous = 0
    for a, b, is_random_next, doc, random_doc in instances:
        assert a and b and len(a) + len(b) <= seq_len - 3
        doc_a = {t // 100_000 for t in a}
        assert doc_a == {order[doc]}  # A comes from its own document only
        if is_random_next:
            assert {t // 100_000 for t in b} == {order[random_doc]} != doc_a
        else:
            assert {t // 100_000 for t in b} == doc_a
            # B continues A: the first sentence of B comes after A's last sentence.
            assert (b[0] % 100_000) // 100 > (a[-1] % 100_000) // 100
            if (b[0] % 100) == 0 and (a[-1] % 100) == len(shuffled[doc][(a[-1] % 100_000) // 100]) - 1:
                contiguous += 1
    # Single-sentence documents never start a pair of their own.
    singles = {k for k, d in enumerate(docs) if len(d) < 2}
    assert singles and not {order[i[3]] for i in instances} & singles
    assert contiguous > 0 and stats.get("truncated_pairs", 0) > 0
    assert stats["random_next_same_unit"] == int(nsp.sum())


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
