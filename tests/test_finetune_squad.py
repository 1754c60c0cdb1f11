"""SQuAD features: character offsets, answer spans, doc stride, max context, n-best back to the text."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.finetune.inputs import InputFormat
from pipeline.finetune.readers import SquadExample
from pipeline.finetune.squad import (
    SquadFeaturizer,
    answer_tokens,
    context_tokens,
    emulate_unanswerable,
    postprocess,
    windows,
)
from pipeline.tokenizer.special import SPECIAL_IDS as S
from pipeline.tokenizer.spm import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer) -> Tokenizer:
    return Tokenizer(small_tokenizer)


def test_token_spans_cover_the_original_characters(tokenizer):
    text = "  The café’s ﬁne “quote” costs ½ of 1234 dollars.\tEnd"
    ctx = context_tokens(tokenizer, text)
    assert ctx.ids == tokenizer.encode([text])[0]
    for start, end in ctx.spans:
        assert 0 <= start <= end <= len(text) and not text[start : start + 1].isspace()
    # Every answer given by character offsets comes back exactly from its tokens' spans.
    for answer in ("café’s", "ﬁne", "“quote”", "½", "1234 dollars", "End"):
        a = text.index(answer)
        first, last = answer_tokens(ctx, a, a + len(answer))
        assert text[ctx.spans[first][0] : ctx.spans[last][1]] == answer


def test_windows_stride_over_long_contexts():
    assert windows(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
    assert windows(3, 4, 2) == [(0, 3)]
    assert windows(0, 4, 2) == [(0, 0)]


def _example(context: str, answer: str, qid: str = "q", question: str = "Who?") -> SquadExample:
    start = context.index(answer)
    return SquadExample(qid, "t", context, question, [{"text": answer, "answer_start": start}], False, 0)


def test_features_targets_and_offsets(tokenizer):
    words = " ".join(f"word{i}" for i in range(60))
    context = f"{words} The answer is Abraham Lincoln of Illinois. {words}"
    ex = _example(context, "Abraham Lincoln")
    bad = SquadExample("bad", "t", context, "Who?", [{"text": "Lincoln", "answer_start": 3}], False, 0)
    featurizer = SquadFeaturizer(tokenizer, InputFormat("bert", 48), max_query_len=8, doc_stride=16)
    features, stats = featurizer.features([ex, bad], training=True)
    assert stats.strided == 1 and stats.answer_offset_mismatch == 1 and stats.skipped_no_valid_answer == 1
    assert {f.example_index for f in features} == {0}  # the question whose offset is wrong is skipped
    with_answer = [f for f in features if f.start_position != f.null_index]
    assert with_answer and all(f.input_ids[0] == S.cls and f.input_ids[-1] == S.sep for f in features)
    ctx = featurizer.context(context)
    for f in with_answer:
        first = f.window_start + f.start_position - f.context_offset
        last = f.window_start + f.end_position - f.context_offset
        assert context[ctx.spans[first][0] : ctx.spans[last][1]] == "Abraham Lincoln"
        assert f.token_type_ids[f.context_offset] == 1 and f.token_type_ids[f.context_offset - 1] == 0
    # every context token has exactly one window where it counts
    counted = [0] * len(ctx.ids)
    for f in features:
        for i, is_max in enumerate(f.max_context):
            counted[f.window_start + i] += is_max
    assert counted == [1] * len(ctx.ids)
    # GPT-1: [START] question [DELIM] window [EXTRACT], no-answer at the extract token
    gpt, _ = SquadFeaturizer(tokenizer, InputFormat("gpt", 48), 8, 16).features([ex], training=True)
    assert all(f.input_ids[0] == S.start and f.input_ids[f.null_index] == S.extract for f in gpt)
    assert all(f.null_index == len(f.input_ids) - 1 and f.input_ids[f.context_offset - 1] == S.delim for f in gpt)


def test_postprocess_picks_the_best_valid_span_and_maps_it_to_the_text(tokenizer):
    context = "The treaty was signed in Paris in 1783 by both sides."
    ex = _example(context, "Paris")
    featurizer = SquadFeaturizer(tokenizer, InputFormat("bert", 64), 16, 16)
    (feature,), _ = featurizer.features([ex], training=False)
    ctx = featurizer.context(context)
    T = len(feature.input_ids)
    start, end = np.zeros(T), np.zeros(T)
    paris = answer_tokens(ctx, context.index("Paris"), context.index("Paris") + 5)
    year = answer_tokens(ctx, context.index("1783"), context.index("1783") + 4)
    o = feature.context_offset
    start[o + paris[0]], end[o + paris[1]] = 5.0, 5.0
    start[o + year[0]], end[o + year[1]] = 4.0, 4.0
    start[o + len(ctx.ids) - 1] = 9.0  # a high start at the final ".", whose only end scores 0
    end[o + paris[0] - 1] = 9.5  # the best end, before every good start
    start[1], end[1] = 20.0, 20.0  # question tokens are never answers
    result = postprocess([ex], [feature], [start], [end], featurizer, n_best=5, max_answer_len=10)["q"]
    assert result["text"] == "Paris"
    assert result["score"] == pytest.approx(10.0)
    assert "1783" in {c["text"] for c in result["nbest"]}  # (the "." start has no end among the 5 best)
    assert result["null_score_diff"] == pytest.approx(0.0 - 10.0)
    assert sum(c["probability"] for c in result["nbest"]) == pytest.approx(1.0)


def test_emulated_unanswerable_questions_get_another_articles_paragraph():
    examples = [
        SquadExample(f"q{i}", f"t{i % 3}", f"context {i % 3}", "?", [{"text": "x", "answer_start": 0}], False, i % 3)
        for i in range(300)
    ]
    out = emulate_unanswerable(examples, 0.3, seed=1)
    changed = [(a, b) for a, b in zip(examples, out, strict=True) if b.is_impossible]
    assert 60 < len(changed) < 120
    assert all(b.answers == [] and b.context != a.context and b.qid == a.qid for a, b in changed)
    assert emulate_unanswerable(examples, 0.3, seed=1) == out  # seeded
