"""A loaded SentencePiece tokenizer directory: model, vocab and ``tokenizer_meta.json``.

Layout of a tokenizer directory (written by ``python -m pipeline tokenizer``):

- ``spm.model``: the SentencePiece model (source of truth for every stage),
- ``spm.vocab``: piece and score per line, in id order (for people and other tools),
- ``tokenizer_meta.json``: the special ids, the model's sha256, vocab size, model type and training settings,
- ``config.yaml``: the resolved config of the run that trained it.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.tokenizer.special import SPECIAL_IDS, SPECIAL_TOKENS, SpecialIds

MODEL_FILE = "spm.model"
VOCAB_FILE = "spm.vocab"
META_FILE = "tokenizer_meta.json"
WORD_START = "\u2581"  # SentencePiece's "▁": the piece begins a new whitespace-separated word


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    """Size and sha256 of a file, as the export manifest and the fine-tuning lineage list their files."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


class Tokenizer:
    """SentencePiece plus the project's fixed special ids. Picklable (re-loads the model in each process)."""

    def __init__(self, directory: str | Path, model_file: str = MODEL_FILE):
        """``model_file``: the SentencePiece model's name in ``directory`` (an export names it spiece.model)."""
        self.directory = Path(directory)
        self.model_file = model_file
        model = self.directory / model_file
        meta_path = self.directory / META_FILE
        if not model.is_file() or not meta_path.is_file():
            raise UserError(
                f"{self.directory} is not a tokenizer directory (needs {model_file} and {META_FILE}); "
                "train one with `python -m pipeline tokenizer`"
            )
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.sha256 = sha256_file(model)
        if self.meta.get("sha256") != self.sha256:
            raise UserError(
                f"{model} does not match {META_FILE} (sha256 {self.sha256[:12]} != "
                f"{str(self.meta.get('sha256'))[:12]}): the model was replaced or corrupted"
            )
        self.special = SpecialIds(**self.meta["special_ids"])
        if self.special != SPECIAL_IDS:
            raise UserError(
                f"{meta_path}: special ids {self.special} differ from the project's fixed ids {SPECIAL_IDS}"
            )
        self._load()

    def _load(self) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(self.directory / self.model_file))
        self.vocab_size = self.sp.get_piece_size()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("sp", None)
        state.pop("word_start", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    # -- encoding -------------------------------------------------------------------------------------------
    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (no special tokens added)."""
        return self.sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @property
    def token_dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every id: uint16 up to 65,536 pieces."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    @cached_property
    def word_start(self) -> np.ndarray:
        """bool[vocab]: the piece starts a new word (for whole-word masking). Specials and bytes are False."""
        flags = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            if not (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_byte(i)):
                flags[i] = self.sp.id_to_piece(i).startswith(WORD_START)
        return flags

    @cached_property
    def special_token_mask(self) -> np.ndarray:
        """bool[vocab]: ids that are special tokens (never masked, never drawn as random replacements)."""
        flags = np.zeros(self.vocab_size, dtype=bool)
        flags[list(self.special.as_dict().values())] = True
        return flags

    def describe(self) -> dict:
        return {
            "path": str(self.directory),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "model_type": self.meta.get("model_type"),
            "special_ids": self.special.as_dict(),
        }


def check_special_pieces(sp) -> None:
    """The trained model must place every special token at its documented id."""
    for token, expected in zip(SPECIAL_TOKENS, SPECIAL_IDS.as_dict().values(), strict=True):
        got = sp.piece_to_id(token)
        if got != expected:
            raise RuntimeError(f"SentencePiece placed {token} at id {got}, expected {expected}")
