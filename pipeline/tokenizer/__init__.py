"""SentencePiece tokenizer with fixed, documented special-token ids."""

from pipeline.tokenizer.special import SPECIAL_TOKENS, SpecialIds

__all__ = ["SPECIAL_TOKENS", "SpecialIds"]
