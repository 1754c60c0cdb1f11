"""Samples -> the model's batch (numpy here; the dataset turns the arrays into tensors).

BERT batch (keys are the model's keyword arguments), every array (B, T) int64 unless noted:
  ``input_ids``       [CLS] A [SEP] B [SEP], masked, padded with [PAD]
  ``token_type_ids``  0 up to and including the first [SEP], 1 after it, 0 on padding
  ``attention_mask``  1 for real tokens, 0 for padding
  ``mlm_labels``      the original id where a prediction is made, -100 elsewhere
  ``nsp_labels``      (B,) 1 when B is a random other document's text (is_random_next)
Packed (``data.packing``): the same batch laid into fewer rows, plus ``position_ids``, ``sequence_ids``,
``cls_index`` and ``cu_seqlens`` (``packing.py``); ``nsp_labels`` stays one per pair.
GPT batch: ``input_ids`` = ids[:-1], ``labels`` = ids[1:] (both (B, seq_len)), ``attention_mask`` all ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipeline.data.masking import IGNORE_INDEX, MaskingRule, mask_batch
from pipeline.data.packing import pack_batch
from pipeline.data.reader import Sample

PAD_MULTIPLE = 8  # pad_to=batch: lengths rounded up to a multiple of 8 (tensor cores; fewer distinct shapes)


@dataclass(frozen=True)
class BertCollator:
    seq_len: int
    pad_to: str  # "seq_len" or "batch"
    pad_id: int
    sep_id: int
    masking: MaskingRule | None  # None: the shards carry static masks
    packing: bool = False  # lay the masked pairs into as few rows as fit them (packing.py)

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> dict[str, np.ndarray]:
        B = len(samples)
        lengths = np.fromiter((len(s.ids) - 1 for s in samples), dtype=np.int64, count=B)
        if self.packing:  # the unpacked batch first (same masks: they do not depend on T), then its layout
            batch = replace(self, packing=False, pad_to="seq_len")(samples, rng)
            return pack_batch(batch, self.seq_len, self.pad_values, self.pad_to)
        if self.pad_to == "seq_len":
            T = self.seq_len
        else:
            T = min(self.seq_len, -(-int(lengths.max()) // PAD_MULTIPLE) * PAD_MULTIPLE)
        valid = np.arange(T) < lengths[:, None]  # (B, T)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        ids[valid] = np.concatenate([s.ids[1:] for s in samples])  # row-major, as the mask enumerates
        nsp = np.fromiter((s.ids[0] for s in samples), dtype=np.int64, count=B)
        first_sep = np.argmax(ids == self.sep_id, axis=1)  # (B,)
        token_types = (np.arange(T) > first_sep[:, None]) & valid
        if self.masking is not None:
            inputs, labels = mask_batch(ids, valid, self.masking, rng)
        else:
            inputs, labels = ids, np.full((B, T), IGNORE_INDEX, dtype=np.int64)
            for row, s in enumerate(samples):
                labels[row, s.mlm[0]] = s.mlm[1]
        return {
            "input_ids": inputs,
            "token_type_ids": token_types.astype(np.int64),
            "attention_mask": valid.astype(np.int64),
            "mlm_labels": labels,
            "nsp_labels": nsp,
        }

    @property
    def pad_values(self) -> dict[str, int]:
        """The per-token keys and their padding values."""
        return {"input_ids": self.pad_id, "token_type_ids": 0, "attention_mask": 0, "mlm_labels": IGNORE_INDEX}


@dataclass(frozen=True)
class GptCollator:
    seq_len: int

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> dict[str, np.ndarray]:
        blocks = np.stack([s.ids for s in samples]).astype(np.int64)  # (B, seq_len + 1)
        return {
            "input_ids": np.ascontiguousarray(blocks[:, :-1]),
            "labels": np.ascontiguousarray(blocks[:, 1:]),
            "attention_mask": np.ones((len(samples), self.seq_len), dtype=np.int64),
        }
