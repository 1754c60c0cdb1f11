"""SQuAD exact match and F1, computed as the official evaluation scripts (v1.1 and v2.0) compute them.

Both normalise an answer by lower-casing, removing punctuation (``string.punctuation``), the articles
a / an / the (whole words) and extra whitespace, then compare: exact match of the normalised strings, and F1
over the bag of normalised tokens. A question scores the maximum over its reference answers; totals are
percentages over all questions.

Where v2.0 differs from v1.1: an empty prediction or reference scores F1 1 only when both are empty (v1.1
gives 0 whenever nothing is shared); references that normalise to nothing are dropped, and a question without
references is unanswerable (its only reference is ""). A model abstains when its no-answer score exceeds a
threshold; ``best_thresholds`` sweeps it on the dev set, as the v2.0 script's ``find_best_thresh`` does.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_v1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_v2(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # no-answer on either side: right only if both abstain
        return float(pred == ref)
    return f1_v1(prediction, reference)


def squad_v1(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """``{"exact_match", "f1", "total"}`` over the questions of ``references`` (a missing prediction scores 0)."""
    em = f1 = 0.0
    for qid, refs in references.items():
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_match(pred, r) for r in refs)
        f1 += max(f1_v1(pred, r) for r in refs)
    total = len(references)
    return {"exact_match": 100.0 * em / max(total, 1), "f1": 100.0 * f1 / max(total, 1), "total": total}


def _v2_references(refs: list[str]) -> list[str]:
    kept = [r for r in refs if normalize_answer(r)]
    return kept or [""]


def raw_scores_v2(predictions: dict[str, str], references: dict[str, list[str]]):
    """Per question: (exact, f1) of the prediction as given, and whether it has an answer."""
    exact, f1, has_answer = {}, {}, {}
    for qid, refs in references.items():
        golds = _v2_references(refs)
        has_answer[qid] = golds != [""]
        if qid not in predictions:
            continue
        pred = predictions[qid]
        exact[qid] = max(exact_match(pred, g) for g in golds)
        f1[qid] = max(f1_v2(pred, g) for g in golds)
    return exact, f1, has_answer


def apply_threshold(scores: dict[str, float], na_scores: dict[str, float], has_answer: dict[str, bool], threshold):
    """Scores after abstaining wherever the no-answer score is above ``threshold``."""
    return {qid: float(not has_answer[qid]) if na_scores[qid] > threshold else score for qid, score in scores.items()}


def best_threshold(predictions, scores, na_scores, has_answer) -> tuple[float, float]:
    """(best score in %, its threshold): abstain on everything, then answer questions in increasing order of
    no-answer score, keeping the best total (the v2.0 script's ``find_best_thresh``)."""
    current = best = sum(1 for qid in has_answer if not has_answer[qid])
    threshold = 0.0
    for qid in sorted(na_scores, key=lambda q: na_scores[q]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            current += scores[qid]
        elif predictions[qid]:
            current -= 1
        if current > best:
            best, threshold = current, na_scores[qid]
    return 100.0 * best / max(len(scores), 1), threshold


def _mean(values: dict[str, float], qids: list[str]) -> float:
    return 100.0 * sum(values[q] for q in qids) / len(qids) if qids else 0.0


def squad_v2(
    predictions: dict[str, str],
    na_scores: dict[str, float],
    references: dict[str, list[str]],
    threshold: float = 0.0,
) -> dict[str, float]:
    """SQuAD 2.0 scores. ``predictions``: each question's best non-empty answer; ``na_scores``: its no-answer
    score (higher = more likely unanswerable; abstain above ``threshold``); ``references``: empty list or only
    blank answers for unanswerable questions.

    Returns exact / f1 overall and on HasAns / NoAns questions at ``threshold``, the best exact and f1 over all
    thresholds with those thresholds (tuned on this set), and HasAns / NoAns at the best-f1 threshold.
    """
    exact_raw, f1_raw, has_answer = raw_scores_v2(predictions, references)
    qids = list(references)
    has = [q for q in qids if has_answer[q]]
    no = [q for q in qids if not has_answer[q]]
    out: dict[str, float] = {"total": len(qids), "HasAns_total": len(has), "NoAns_total": len(no)}
    exact = apply_threshold(exact_raw, na_scores, has_answer, threshold)
    f1 = apply_threshold(f1_raw, na_scores, has_answer, threshold)
    exact.update({q: 0.0 for q in qids if q not in exact})
    f1.update({q: 0.0 for q in qids if q not in f1})
    out.update(exact=_mean(exact, qids), f1=_mean(f1, qids))
    out.update(HasAns_exact=_mean(exact, has), HasAns_f1=_mean(f1, has))
    out.update(NoAns_exact=_mean(exact, no), NoAns_f1=_mean(f1, no))
    out["best_exact"], out["best_exact_thresh"] = best_threshold(predictions, exact_raw, na_scores, has_answer)
    out["best_f1"], out["best_f1_thresh"] = best_threshold(predictions, f1_raw, na_scores, has_answer)
    tuned = apply_threshold(f1_raw, na_scores, has_answer, out["best_f1_thresh"])
    tuned_exact = apply_threshold(exact_raw, na_scores, has_answer, out["best_f1_thresh"])
    out.update(best_HasAns_f1=_mean(tuned, has), best_NoAns_f1=_mean(tuned, no))
    out.update(best_HasAns_exact=_mean(tuned_exact, has), best_NoAns_exact=_mean(tuned_exact, no))
    return out
