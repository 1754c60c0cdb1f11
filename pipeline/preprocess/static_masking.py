"""Static (baked-in) masked-LM predictions, as the original ``create_masked_lm_predictions``.

Used only with ``data.static_masking``, for a faithful reproduction of the original recipe (masks fixed at
preprocessing time, usually with ``dupe_factor`` 10). By default masks are drawn by the loader at every epoch.

Differences from the original, all in the direction of "never special tokens": [CLS], [SEP] and every other
special id are never candidates, and random replacements are drawn from the non-special vocabulary.
Whole-word masking uses SentencePiece's word-start marker instead of WordPiece's ``##``.
"""

from __future__ import annotations

import random

import numpy as np


def mask_sequence(
    tokens: list[int],
    rng: random.Random,
    *,
    masked_lm_prob: float,
    max_predictions: int,
    mask_id: int,
    special: np.ndarray,
    word_start: np.ndarray,
    whole_word: bool,
    vocab_size: int,
    num_special: int,
) -> tuple[list[int], list[int], list[int]]:
    """Returns (masked tokens, positions, original labels) with positions sorted."""
    cand_indexes: list[list[int]] = []
    for i, tok in enumerate(tokens):
        if special[tok]:
            continue
        if whole_word and cand_indexes and not word_start[tok] and cand_indexes[-1][-1] == i - 1:
            cand_indexes[-1].append(i)
        else:
            cand_indexes.append([i])
    rng.shuffle(cand_indexes)
    output = list(tokens)
    num_to_predict = min(max_predictions, max(1, round(len(tokens) * masked_lm_prob)))
    covered: set[int] = set()
    masked: list[tuple[int, int]] = []
    for index_set in cand_indexes:
        if len(masked) >= num_to_predict:
            break
        # Whole words that would overshoot the budget are skipped, not split.
        if len(masked) + len(index_set) > num_to_predict:
            continue
        if any(i in covered for i in index_set):
            continue
        for i in index_set:
            covered.add(i)
            if rng.random() < 0.8:
                replacement = mask_id
            elif rng.random() < 0.5:
                replacement = tokens[i]
            else:
                replacement = rng.randint(num_special, vocab_size - 1)
            output[i] = replacement
            masked.append((i, tokens[i]))
    masked.sort()
    return output, [p for p, _ in masked], [label for _, label in masked]
