"""The special tokens and their fixed ids, shared by every stage.

The ids never depend on the corpus: a model, a shard set and a fine-tuning head built months apart agree on
what id 4 means. SentencePiece reserves 0 and 1 for [PAD] and [UNK]; the others are *control* symbols, so
the text "[MASK]" in a document is tokenized as ordinary characters and can never inject a mask token.

| id | token     | used by                                                      |
|----|-----------|--------------------------------------------------------------|
| 0  | [PAD]     | padding (attention mask 0, ignored by every loss)            |
| 1  | [UNK]     | unknown piece (rare: byte fallback covers any UTF-8 input)   |
| 2  | [CLS]     | BERT: first token; pooled for NSP and classification         |
| 3  | [SEP]     | BERT: ends segment A and segment B                           |
| 4  | [MASK]    | BERT: masked-LM input replacement                            |
| 5  | [START]   | GPT-1: start token of a fine-tuning input                    |
| 6  | [DELIM]   | GPT-1: delimiter between the parts of a fine-tuning input    |
| 7  | [EXTRACT] | GPT-1: last token; its state feeds the fine-tuning head      |
| 8  | [EOD]     | GPT: end of document, joins documents in packed blocks       |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SPECIAL_TOKENS: tuple[str, ...] = (
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[START]",
    "[DELIM]",
    "[EXTRACT]",
    "[EOD]",
)


@dataclass(frozen=True)
class SpecialIds:
    pad: int = 0
    unk: int = 1
    cls: int = 2
    sep: int = 3
    mask: int = 4
    start: int = 5
    delim: int = 6
    extract: int = 7
    eod: int = 8

    @property
    def num_special(self) -> int:
        return len(SPECIAL_TOKENS)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def by_token(self) -> dict[str, int]:
        return dict(zip(SPECIAL_TOKENS, asdict(self).values(), strict=True))


SPECIAL_IDS = SpecialIds()
