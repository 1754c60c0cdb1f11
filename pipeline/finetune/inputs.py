"""BERT and GPT-1 fine-tuning inputs from token ids (the "input transformations" of both papers).

| task            | BERT                              | GPT-1                                  | head reads   |
|-----------------|-----------------------------------|----------------------------------------|--------------|
| one text        | [CLS] x [SEP]                     | [START] x [EXTRACT]                    | [CLS] / extract |
| pair            | [CLS] a [SEP] b [SEP], segments 0/1 | [START] a [DELIM] b [EXTRACT]        | [CLS] / extract |
| choice k        | [CLS] context [SEP] choice_k [SEP] | [START] context [DELIM] choice_k [EXTRACT] | one score each |
| SQuAD window    | [CLS] question [SEP] window [SEP] | [START] question [DELIM] window [EXTRACT] | every token |

Inputs longer than ``max_len`` are truncated, never dropped, and the caller counts them: one text keeps its
beginning; a pair (or context + choice) loses tokens from the end of the longer part first, as BERT's
``_truncate_seq_pair`` does, so both keep as much as possible. SQuAD windows are cut by ``squad.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.tokenizer.special import SPECIAL_IDS


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int]
    summary_index: int  # the position the sequence-level head reads: [CLS] (0) or GPT-1's extract token
    truncated: bool = False


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int], bool]:
    """Drop tokens from the end of the longer of ``a`` and ``b`` until both fit in ``budget``."""
    a, b = list(a), list(b)
    truncated = len(a) + len(b) > budget
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
    return a, b, truncated


class InputFormat:
    """Builds the inputs of one architecture within ``max_len`` tokens."""

    def __init__(self, arch: str, max_len: int):
        if arch not in ("bert", "gpt"):
            raise ValueError(f"arch must be bert or gpt, got {arch!r}")
        self.arch = arch
        self.max_len = max_len
        s = SPECIAL_IDS
        # (first, middle, last) special tokens around the parts
        self.first, self.middle, self.last = (s.cls, s.sep, s.sep) if arch == "bert" else (s.start, s.delim, s.extract)

    def single(self, ids: list[int]) -> Encoded:
        budget = self.max_len - 2
        body = ids[:budget]
        input_ids = [self.first, *body, self.last]
        return Encoded(input_ids, [0] * len(input_ids), self._summary(input_ids), len(ids) > budget)

    def pair(self, a: list[int], b: list[int]) -> Encoded:
        a, b, truncated = truncate_pair(a, b, self.max_len - 3)
        input_ids = [self.first, *a, self.middle, *b, self.last]
        if self.arch == "bert":
            token_type_ids = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        else:  # GPT-1 has no segment embeddings: the delimiter alone marks the boundary
            token_type_ids = [0] * len(input_ids)
        return Encoded(input_ids, token_type_ids, self._summary(input_ids), truncated)

    def _summary(self, input_ids: list[int]) -> int:
        return 0 if self.arch == "bert" else len(input_ids) - 1
