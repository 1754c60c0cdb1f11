"""SQuAD EM / F1 against hand-worked cases (the official v1.1 and v2.0 evaluation scripts' rules)."""

from __future__ import annotations

import pytest

from pipeline.finetune.squad_metrics import (
    best_threshold,
    exact_match,
    f1_v1,
    f1_v2,
    normalize_answer,
    raw_scores_v2,
    squad_v1,
    squad_v2,
)


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Eiffel Tower!", "eiffel tower"),  # lower case, punctuation, leading article
        ("  a  cat, an   owl and THE dog. ", "cat owl and dog"),  # every article, extra whitespace
        ("theatre anthem", "theatre anthem"),  # articles only as whole words
        ("U.S.-based", "usbased"),  # punctuation removed without a space
        ("Ünïcode — dash", "ünïcode — dash"),  # only string.punctuation (ASCII) is removed
        ("", ""),
    ],
)
def test_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos", "Denver Broncos!") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # prediction "denver broncos team" vs gold "broncos": 1 shared token, P = 1/3, R = 1 -> F1 = 0.5
    assert f1_v1("Denver Broncos team", "the Broncos") == pytest.approx(0.5)
    # shared tokens are a multiset intersection: pred [x, b, b] and gold [b, c] share one b; P = 1/3, R = 1/2
    assert f1_v1("x b b", "b c") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4
    assert f1_v1("nothing in common", "other words") == 0.0


def test_empty_answers_differ_between_v1_and_v2():
    # v1.1: no shared token -> 0, even when both are empty; v2.0: both empty is a correct abstention.
    assert f1_v1("", "") == 0.0
    assert f1_v2("", "") == 1.0
    assert f1_v2("", "Paris") == 0.0
    assert f1_v2("Paris", "") == 0.0
    assert f1_v2("the", "a") == 1.0  # both normalise to nothing


def test_squad_v1_takes_the_best_reference_and_counts_missing_predictions():
    refs = {"q1": ["Denver Broncos", "Broncos"], "q2": ["1990"], "q3": ["red"]}
    preds = {"q1": "the broncos", "q2": "in 1990 and 1991"}  # q3 missing -> 0
    scores = squad_v1(preds, refs)
    # q1: EM 1 (matches "Broncos"), F1 1. q2: EM 0; pred "in 1990 and 1991" (4 tokens), gold 1 token, 1 shared:
    # P = 1/4, R = 1 -> F1 = 0.4. q3: 0.
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.4) / 3)
    assert scores["total"] == 3


def test_squad_v2_threshold_hasans_noans_by_hand():
    refs = {"a": ["Paris"], "b": ["blue sky"], "c": [], "d": [""]}  # c and d are unanswerable
    preds = {"a": "Paris", "b": "sky", "c": "London", "d": "x"}  # the best non-empty span of each question
    na = {"a": -2.0, "b": 1.0, "c": 3.0, "d": -1.0}  # no-answer score minus best span score
    _, f1, has = raw_scores_v2(preds, refs)
    assert has == {"a": True, "b": True, "c": False, "d": False}
    assert f1["b"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    s = squad_v2(preds, na, refs, threshold=0.0)
    # threshold 0: abstain on b and c. a right (1), b abstains but has an answer (0), c abstains right (1),
    # d answers "x" but has none (0).
    assert s["exact"] == pytest.approx(50.0)
    assert s["f1"] == pytest.approx(50.0)
    assert s["HasAns_exact"] == pytest.approx(50.0) and s["NoAns_exact"] == pytest.approx(50.0)
    assert (s["HasAns_total"], s["NoAns_total"]) == (2, 2)
    # Sweep (ascending na): start abstaining on all = 2 right (c, d). Answer a (na -2): +1 -> 3.
    # Answer d (-1): it has no answer and a non-empty prediction -> 2. Answer b (1): +F1 2/3 -> 2.667. c: 1.667.
    assert s["best_exact"] == pytest.approx(75.0) and s["best_exact_thresh"] == -2.0
    assert s["best_f1"] == pytest.approx(75.0) and s["best_f1_thresh"] == -2.0
    assert s["best_HasAns_f1"] == pytest.approx(50.0) and s["best_NoAns_f1"] == pytest.approx(100.0)


def test_best_threshold_keeps_zero_when_abstaining_everywhere_is_best():
    refs = {"a": [], "b": []}
    preds = {"a": "x", "b": "y"}
    exact, _, has = raw_scores_v2(preds, refs)
    assert best_threshold(preds, exact, {"a": 1.0, "b": 2.0}, has) == (100.0, 0.0)
