"""Dynamic masked-LM predictions for a whole batch at once (numpy, no Python loop over tokens).

The rule is the original ``create_masked_lm_predictions`` with SentencePiece words:

- candidates are the non-special tokens; with whole-word masking a candidate unit is a word (a piece that
  starts with "▁", or follows a special token, plus the continuation pieces after it), otherwise every token;
- each sequence predicts exactly ``min(max_predictions, max(1, round(mask_prob * candidates)))`` tokens: units
  are taken in a random order, skipping a word that would overshoot the budget (as the original does, so
  words are never split). An exact count per sequence rather than an independent draw per token keeps the
  cap from cutting into the distribution: with a Bernoulli draw the cap would lower the effective rate;
- every predicted token is replaced by [MASK] (80%), by a random non-special token (10%) or kept (10%).

The greedy "take units in random order while they fit" runs for all sequences together: each pass takes, per
sequence, the longest prefix (in random order) of still-fitting units, then drops the units that no longer fit.
That is the sequential greedy rule exactly; it needs as many passes as there are overshooting words on the
way, a handful in practice and two without whole words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # label of a position that is not predicted (torch's cross_entropy default)


@dataclass(frozen=True)
class MaskingRule:
    mask_prob: float
    mask_replace_prob: float
    random_replace_prob: float
    max_predictions: int
    mask_id: int
    special: np.ndarray  # bool[vocab]: never predicted
    replacement_ids: np.ndarray  # int64: the non-special ids random replacements are drawn from
    word_start: np.ndarray | None = None  # bool[vocab]: set for whole-word masking


def mask_batch(
    ids: np.ndarray, valid: np.ndarray, rule: MaskingRule, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(masked input ids, labels) for ids (B, T) int64 with ``valid`` (B, T) marking real tokens.

    Labels hold the original id at predicted positions and ``IGNORE_INDEX`` elsewhere.
    """
    B, T = ids.shape
    candidate = valid & ~rule.special[ids]  # (B, T)
    if rule.word_start is not None:
        after_candidate = np.zeros_like(candidate)
        after_candidate[:, 1:] = candidate[:, :-1]
        unit_start = candidate & (rule.word_start[ids] | ~after_candidate)
    else:
        unit_start = candidate
    flat_start = unit_start.ravel()
    unit_of = np.cumsum(flat_start) - 1  # (B*T,): the unit each position belongs to (where it is a candidate)
    start_positions = np.flatnonzero(flat_start)
    num_units = len(start_positions)
    unit_row = start_positions // T
    unit_len = np.bincount(unit_of[candidate.ravel()], minlength=num_units)

    num_candidates = candidate.sum(axis=1)
    budget = np.minimum(rule.max_predictions, np.maximum(1, np.rint(num_candidates * rule.mask_prob))).astype(np.int64)
    budget[num_candidates == 0] = 0

    # Units sorted by (row, random score); a score below 0.5 can never round row + score up to the next row.
    order = np.argsort(unit_row + 0.5 * rng.random(num_units), kind="stable")
    row_sorted, len_sorted = unit_row[order], unit_len[order]
    row_begin = np.searchsorted(row_sorted, np.arange(B))  # first sorted unit of each row
    taken = np.zeros(num_units, dtype=bool)
    open_ = np.ones(num_units, dtype=bool)
    remaining = budget.copy()
    while True:
        open_ &= ~taken & (len_sorted <= remaining[row_sorted])
        if not open_.any():
            break
        lengths = np.where(open_, len_sorted, 0)
        running = np.cumsum(lengths)
        before_row = np.concatenate([[0], running])[row_begin]  # (B,) total of earlier rows
        within_row = running - before_row[row_sorted]
        take = open_ & (within_row <= remaining[row_sorted])
        taken |= take
        remaining -= np.bincount(row_sorted[take], weights=len_sorted[take], minlength=B).astype(np.int64)

    unit_taken = np.zeros(num_units, dtype=bool)
    unit_taken[order] = taken
    predicted = candidate.ravel() & unit_taken[unit_of]  # unit_of is -1 before a row's first unit: masked out
    positions = np.flatnonzero(predicted)

    labels = np.full(B * T, IGNORE_INDEX, dtype=np.int64)
    labels[positions] = ids.ravel()[positions]
    inputs = ids.copy().ravel()
    draw = rng.random(len(positions))
    to_mask = draw < rule.mask_replace_prob
    to_random = ~to_mask & (draw < rule.mask_replace_prob + rule.random_replace_prob)
    inputs[positions[to_mask]] = rule.mask_id
    random_ids = rule.replacement_ids[rng.integers(0, len(rule.replacement_ids), int(to_random.sum()))]
    inputs[positions[to_random]] = random_ids
    return inputs.reshape(B, T), labels.reshape(B, T)
