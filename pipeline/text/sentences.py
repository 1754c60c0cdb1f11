"""Sentence splitting for BERT's sentence pairs.

The default splitter is rule-based English, chosen to be fast, deterministic and dependency-free:

1. Blank lines always end a paragraph, and a paragraph always ends a sentence.
2. Single newlines inside a paragraph are either joined as spaces (``newlines: join``, the default: hard-wrapped
   text) or treated as boundaries (``newlines: split``: one-sentence-per-line corpora, BERT's own input format).
3. Inside a paragraph, a boundary is ``.``, ``!``, ``?`` or ``…`` (repeats allowed), optionally followed by closing
   quotes or brackets, then whitespace, then a word that starts with an upper-case letter, a digit, or an opening
   quote/bracket.
4. A ``.`` does *not* end a sentence after a known abbreviation (``Mr.``, ``Gen.``, ``Jan.``, ``e.g.`` …), after a
   single-letter initial (``J. Q. Adams``) or after dotted initials (``U.S.``, ``D.C.``).
5. A "sentence" longer than ``max_chars`` (tables, lists, lines without punctuation) is cut at whitespace into
   pieces of at most ``max_chars`` characters; the number of such cuts is counted and reported.

Splitters are pluggable: ``sentences.splitter`` names a registered splitter (``rules``, ``lines``) or a
``package.module:callable`` that returns a splitter (any object with ``split(text) -> list[str]``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from pipeline.config import option


@dataclass
class SentenceConfig:
    """How documents are split into sentences (used for BERT pairs and for tokenizer training)."""

    splitter: str = option("rules", "registered splitter name (rules, lines) or package.module:factory")
    newlines: Literal["join", "split"] = option(
        "join", "single newlines inside a paragraph: join (wrapped text) or split (one sentence per line)"
    )
    max_chars: int = option(2000, "longer sentences are cut at whitespace into pieces of at most this many chars")

    def __post_init__(self) -> None:
        if self.max_chars < 16:
            raise ValueError(f"sentences.max_chars must be >= 16, got {self.max_chars}")


class SentenceSplitter(Protocol):
    def split(self, text: str) -> list[str]: ...


# Lower-cased, without the trailing dot. Titles, military and political ranks, months, and common Latin
# abbreviations: the words after them are usually capitalised names, so a capital letter proves nothing.
ABBREVIATIONS = frozenset(
    """
    mr mrs ms messrs mme mlle dr prof rev hon sr jr st mt ft gen col lt maj capt cmdr adm sgt cpl pvt gov sen rep
    pres supt atty asst assoc dept univ jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun
    no nos vol vols art arts sec secs ch chap fig figs pp ed eds approx est vs viz cf al inc ltd co corp bros ave
    blvd rd hwy
    """.split()
)
# Not listed: "etc." -- followed by a capitalised word it almost always ends the sentence.

# Matches the *last* terminal mark of a run ("..." matches at its final dot), its closers and the whitespace;
# no capture groups: they double the cost of the scan, which is the splitter's main cost.
_BOUNDARY = re.compile(r"""[.!?…]["'”’»)\]]*\s+(?=["'“‘«(\[]*[A-Z0-9])""")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
_DOTTED_INITIALS = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")


def _is_abbreviation(text: str, punct_start: int) -> bool:
    """Does the "." at ``punct_start`` end an abbreviation or an initial rather than a sentence?"""
    # Most dots end a word of seven or more letters: not an abbreviation (the longest is six), not an initial,
    # not dotted initials. One C-level check answers them before the word is cut out (the splitter's hot path).
    if punct_start >= 7 and text[punct_start - 7 : punct_start].isalpha():
        return False
    # The word the dot belongs to, looking back a bounded window (abbreviations are short; an unbounded search
    # back through a long paragraph would make the splitter quadratic). rsplit: only the last word is cut out.
    words = text[max(0, punct_start - 32) : punct_start].rsplit(None, 1)
    if not words:
        return False
    word = words[-1].lstrip("\"'“‘«([")
    if not word:
        return False
    if len(word) == 1:  # an initial: "J. Q. Adams"
        return word.isalpha() and word.isupper()
    if "." in word and _DOTTED_INITIALS.match(word):  # "U.S", "D.C", "e.g"
        return True
    return word.lower() in ABBREVIATIONS


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    pieces: list[str] = []
    rest = sentence
    while len(rest) > max_chars:
        cut = rest.rfind(" ", 0, max_chars + 1)
        if cut <= 0:  # no whitespace: a hard cut is the only option
            cut = max_chars
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]


class _CuttingSplitter:
    """Shared handling of paragraphs, newlines and over-long sentences."""

    def __init__(self, max_chars: int = 2000, newlines: str = "join"):
        self.max_chars = max_chars
        self.newlines = newlines
        self.num_long_cuts = 0  # sentences that had to be cut at whitespace (reported by the sharder)

    def split_paragraph(self, paragraph: str) -> list[str]:
        raise NotImplementedError

    def split(self, text: str) -> list[str]:
        out: list[str] = []
        for paragraph in _PARAGRAPH.split(text):
            blocks = paragraph.split("\n") if self.newlines == "split" else [paragraph]
            for block in blocks:
                # Inner whitespace is left as it is: SentencePiece normalises it when encoding, and a
                # substitution pass over the text would cost as much as the boundary scan itself.
                block = block.strip()
                if not block:
                    continue
                for sentence in self.split_paragraph(block):
                    if len(sentence) > self.max_chars:
                        self.num_long_cuts += 1
                        out.extend(_cut_long(sentence, self.max_chars))
                    elif sentence:
                        out.append(sentence)
        return out


class RuleSplitter(_CuttingSplitter):
    """The documented rule-based English splitter (see the module docstring)."""

    def split_paragraph(self, paragraph: str) -> list[str]:
        sentences: list[str] = []
        start = 0
        for m in _BOUNDARY.finditer(paragraph):
            punct = m.start()
            if paragraph[punct] == "." and _is_abbreviation(paragraph, punct):
                continue
            sentence = paragraph[start : m.end()].strip()
            if sentence:
                sentences.append(sentence)
            start = m.end()
        tail = paragraph[start:].strip()
        if tail:
            sentences.append(tail)
        return sentences


class LineSplitter(_CuttingSplitter):
    """Every non-empty line is a sentence (corpora already split one sentence per line)."""

    def __init__(self, max_chars: int = 2000, newlines: str = "split"):
        super().__init__(max_chars=max_chars, newlines="split")

    def split_paragraph(self, paragraph: str) -> list[str]:
        return [paragraph]


SPLITTERS: dict[str, Callable[..., SentenceSplitter]] = {"rules": RuleSplitter, "lines": LineSplitter}


def build_splitter(cfg: SentenceConfig) -> SentenceSplitter:
    if cfg.splitter in SPLITTERS:
        return SPLITTERS[cfg.splitter](max_chars=cfg.max_chars, newlines=cfg.newlines)
    if ":" in cfg.splitter:
        module_name, _, attr = cfg.splitter.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"sentences.splitter: cannot import {cfg.splitter!r}: {exc}") from None
        splitter = factory(max_chars=cfg.max_chars, newlines=cfg.newlines)
        if not callable(getattr(splitter, "split", None)):
            raise ValueError(f"sentences.splitter: {cfg.splitter!r} did not return an object with split(text)")
        return splitter
    raise ValueError(f"sentences.splitter: unknown splitter {cfg.splitter!r} (registered: {', '.join(SPLITTERS)})")
