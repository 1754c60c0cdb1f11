"""The rule-based sentence splitter: boundaries, abbreviations, paragraphs, over-long sentences, plugins."""

from __future__ import annotations

import pytest

from pipeline.text.sentences import LineSplitter, RuleSplitter, SentenceConfig, build_splitter


def split(text: str, **kw) -> list[str]:
    return build_splitter(SentenceConfig(**kw)).split(text)


def test_basic_boundaries_and_closers():
    assert split('It rained. "Why?" she asked! Then (later) it stopped.') == [
        "It rained.",
        '"Why?" she asked!',
        "Then (later) it stopped.",
    ]


def test_abbreviations_initials_and_decimals_do_not_split():
    text = "Mr. Smith met Gen. U. S. Grant in Washington, D.C. on Jan. 5. The U.S. grew 3.5 percent. Done."
    assert split(text) == [
        "Mr. Smith met Gen. U. S. Grant in Washington, D.C. on Jan. 5.",
        "The U.S. grew 3.5 percent.",
        "Done.",
    ]


def test_lower_case_after_period_is_not_a_boundary():
    assert split("See fig. three for details. Next one.") == ["See fig. three for details.", "Next one."]


def test_paragraphs_always_break_and_newline_modes():
    text = "First line without stop\nstill the same sentence.\n\nNew paragraph"
    assert split(text) == ["First line without stop\nstill the same sentence.", "New paragraph"]
    assert split(text, newlines="split") == ["First line without stop", "still the same sentence.", "New paragraph"]


def test_over_long_sentences_are_cut_at_whitespace_and_counted():
    splitter = RuleSplitter(max_chars=50)
    words = " ".join(f"word{i}" for i in range(40))
    pieces = splitter.split(words)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces) == words
    assert splitter.num_long_cuts == 1
    no_space = "x" * 120
    assert splitter.split(no_space) == ["x" * 50, "x" * 50, "x" * 20]


def test_line_splitter_and_plugins():
    assert LineSplitter().split("a b\nc d.\n\ne") == ["a b", "c d.", "e"]
    custom = build_splitter(SentenceConfig(splitter="pipeline.text.sentences:LineSplitter"))
    assert isinstance(custom, LineSplitter)
    with pytest.raises(ValueError, match="unknown splitter"):
        build_splitter(SentenceConfig(splitter="nope"))
    with pytest.raises(ValueError, match="cannot import"):
        build_splitter(SentenceConfig(splitter="no.such.module:thing"))


def test_linear_time_on_a_long_paragraph():
    import time

    text = "This is a sentence with Mr. Abbrev inside. " * 20000  # ~860 KB, one paragraph
    t = time.perf_counter()
    sentences = split(text)
    assert len(sentences) == 20000
    # A generous bound: the quadratic version took minutes on this input.
    assert time.perf_counter() - t < 5
