"""Packing: the sequences of a batch laid into as few rows of ``seq_len`` as fit them, instead of one per row.

A BERT pair or a fine-tuning sentence that is shorter than ``seq_len`` leaves the rest of its row as padding,
on which every layer still computes. Packing is a layout of the *same* batch (the packing paper behind
MLPerf's BERT, arXiv 2107.02027): a batch of ``N`` sequences, masked and labelled exactly as unpacked, is
placed into ``R <= N`` rows by first-fit decreasing (longest first, each into the first row with room; ties
keep the batch order). The batch keeps its ``N`` sequences, so the plan, the masks, the exact resume and the
every-sample-once guarantees of the loader are those of the unpacked batch; the optimisation recipe does not
change either (a step sees the same sequences); only the number of rows, and so the compute, shrinks.

Per-token arrays (B, T) become (R, T) and gain:

  ``position_ids``  0, 1, ... within each sequence (0 on padding)
  ``sequence_ids``  1, 2, ... for the sequences of a row, 0 on padding (the model's block-diagonal attention)
  ``cls_index``     (N,) the flat position (row * T + offset) of each sequence's first token, in batch order
  ``cu_seqlens``    (S + 1,) starts of the runs of the flattened rows (each sequence, and each row's padding
                    tail as a run of its own), for the variable-length attention kernel on a GPU

Per-sequence arrays ((B,) such as ``nsp_labels``) keep their order: sequence ``i`` of the packed batch is row
``i`` of the unpacked one. Real tokens must be a prefix of each unpacked row (the collators pad at the end).
"""

from __future__ import annotations

import numpy as np

PACKED_KEYS = ("position_ids", "sequence_ids", "cls_index", "cu_seqlens")
PAD_MULTIPLE = 8


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, offset) of each item of ``lengths`` and the number of rows, by first-fit decreasing."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"sequence lengths must be within [1, {capacity}], got {lengths.min()}..{lengths.max()}")
    row = np.empty(len(lengths), dtype=np.int64)
    offset = np.empty(len(lengths), dtype=np.int64)
    fill = np.zeros(len(lengths), dtype=np.int64)  # at most one row per item
    num_rows = 0
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(fill[:num_rows] + lengths[i] <= capacity)
        r = int(fits[0]) if fits.size else num_rows
        num_rows = max(num_rows, r + 1)
        row[i], offset[i] = r, fill[r]
        fill[r] += lengths[i]
    return row, offset, num_rows


def pack_batch(
    batch: dict[str, np.ndarray],
    seq_len: int,
    pad_values: dict[str, int],
    pad_to: str = "seq_len",
) -> dict[str, np.ndarray]:
    """The packed layout of a collated batch (see the module doc).

    ``pad_values``: per-token key -> its padding value; every other key is per sequence and kept as is.
    ``batch["attention_mask"]`` gives the lengths. ``pad_to="batch"`` trims the rows to the longest row,
    rounded up to a multiple of 8; ``"seq_len"`` keeps ``seq_len`` columns.
    """
    mask = batch["attention_mask"]
    lengths = mask.sum(1).astype(np.int64)  # (N,)
    N = len(lengths)
    row, offset, R = first_fit_decreasing(lengths, seq_len)
    fill = np.bincount(row, weights=lengths, minlength=R).astype(np.int64)  # (R,)
    T = seq_len if pad_to == "seq_len" else min(seq_len, -(-int(fill.max()) // PAD_MULTIPLE) * PAD_MULTIPLE)

    # For every packed position: the unpacked (sequence, column) it comes from; -1 on padding.
    source_seq = np.full(R * T, -1, dtype=np.int64)
    source_col = np.zeros(R * T, dtype=np.int64)
    seq_of_token = np.repeat(np.arange(N), lengths)  # (total,)
    col_of_token = np.arange(len(seq_of_token)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat_of_token = np.repeat(row * T + offset, lengths) + col_of_token
    source_seq[flat_of_token] = seq_of_token
    source_col[flat_of_token] = col_of_token
    real = source_seq >= 0

    out: dict[str, np.ndarray] = {}
    for key, value in batch.items():
        if key in pad_values:
            packed = np.full(R * T, pad_values[key], dtype=value.dtype)
            packed[real] = value[source_seq[real], source_col[real]]
            out[key] = packed.reshape(R, T)
        else:
            out[key] = value
    out["position_ids"] = np.where(real, source_col, 0).reshape(R, T)
    # Rank of each sequence within its row, by offset: 1, 2, ... (0 stays padding).
    order = np.lexsort((offset, row))
    rank_in_row = np.empty(N, dtype=np.int64)
    rank_in_row[order] = np.arange(N) - np.searchsorted(row[order], row[order])
    sequence_ids = np.zeros(R * T, dtype=np.int64)
    sequence_ids[real] = rank_in_row[source_seq[real]] + 1
    out["sequence_ids"] = sequence_ids.reshape(R, T)
    out["cls_index"] = row * T + offset
    # Runs of the flattened rows: the sequences in row order, then each row's padding tail.
    starts = np.concatenate([row[order] * T + offset[order], np.flatnonzero(fill < T) * T + fill[fill < T]])
    out["cu_seqlens"] = np.append(np.sort(starts), R * T).astype(np.int64)
    return out


def max_seqlen(cu_seqlens: np.ndarray) -> int:
    """The longest run of a packed batch (the varlen kernel's ``max_seqlen``), from the host copy."""
    return int(np.diff(cu_seqlens).max(initial=0))
