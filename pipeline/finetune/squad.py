"""SQuAD: windows over long contexts (doc stride), answer spans in tokens, and answers back in the text.

Contexts are tokenized once with SentencePiece's offsets, so every context token knows the characters of the
original context it covers (byte-fallback pieces share the span of the character they spell; leading spaces
are not part of a token's span). A question with a context longer than a window gets several windows,
``doc_stride`` tokens apart; a token is scored only in the window where it has the most context on both sides
(BERT's ``_check_is_max_context``).

Training: the target is the answer's first and last token, or the no-answer position ([CLS] / GPT-1's extract
token) in windows that do not contain the whole answer and for unanswerable questions. An answer whose
``answer_start`` does not point at its text in the context is reported and skipped (the question too, when no
answer of it is usable).

Prediction: per window the ``n_best`` best starts and ends inside the context, pairs with end >= start and at
most ``max_answer_len`` tokens, scored start + end logit; the answer is the original context text between the
first character of the start token and the last of the end token. SQuAD 2.0: the no-answer score is the
smallest [CLS] (extract) start + end over the question's windows; ``null_score_diff`` = that minus the best
span's score, thresholded in ``squad_metrics``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.finetune.inputs import InputFormat
from pipeline.finetune.readers import SquadExample
from pipeline.tokenizer.spm import Tokenizer


@dataclass
class ContextTokens:
    ids: list[int]
    spans: list[tuple[int, int]]  # (first char, end char) in the context of each token


@dataclass
class SquadFeature:
    example_index: int
    input_ids: list[int]
    token_type_ids: list[int]
    context_offset: int  # input position of the window's first context token
    window_start: int  # index of that token among the context's tokens
    window_len: int
    max_context: list[bool]  # per window token: this window gives it the most context
    null_index: int  # [CLS] (0) or GPT-1's extract token (last)
    start_position: int = 0  # training targets (input positions)
    end_position: int = 0


@dataclass
class SquadStats:
    """What happened to the questions on their way to features (reported, never silent)."""

    questions: int = 0
    features: int = 0
    strided: int = 0  # questions whose context needed more than one window
    questions_truncated: int = 0  # longer than task.max_query_len
    answer_offset_mismatch: int = 0  # answers whose answer_start does not point at their text
    skipped_no_valid_answer: int = 0  # training questions without a usable answer (skipped)
    answer_outside_windows: int = 0  # training: the answer is not inside any single window
    mismatched_examples: list[str] = field(default_factory=list)  # first few, for the report

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def context_tokens(tokenizer: Tokenizer, text: str) -> ContextTokens:
    """Token ids of ``text`` with the character span each token covers."""
    proto = tokenizer.sp.encode(text, return_type="proto")
    encoded = text.encode("utf-8")
    byte_to_char = np.zeros(len(encoded) + 1, dtype=np.int64)
    pos = 0
    for i, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        byte_to_char[pos : pos + n] = i
        pos += n
    byte_to_char[pos] = len(text)
    ids, spans = [], []
    pieces = list(proto.pieces)
    next_span = (len(text), len(text))
    # Right to left, so that a zero-width piece (a byte-fallback prefix) takes the span of the piece after it.
    reversed_spans = []
    for piece in reversed(pieces):
        start, end = int(byte_to_char[piece.begin]), int(byte_to_char[piece.end])
        if end > start:
            while start < end and text[start].isspace():
                start += 1
            next_span = (start, end)
        reversed_spans.append(next_span)
    spans = reversed_spans[::-1]
    ids = [int(p.id) for p in pieces]
    return ContextTokens(ids, spans)


def answer_tokens(ctx: ContextTokens, start_char: int, end_char: int) -> tuple[int, int] | None:
    """First and last token covering the characters [start_char, end_char) of the context."""
    first = next((i for i, (s, e) in enumerate(ctx.spans) if e > start_char), None)
    last = next((i for i in range(len(ctx.spans) - 1, -1, -1) if ctx.spans[i][0] < end_char), None)
    if first is None or last is None or last < first:
        return None
    return first, last


def windows(num_tokens: int, size: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of the windows covering ``num_tokens`` context tokens (at least one, maybe empty)."""
    out, start = [], 0
    while True:
        length = min(size, num_tokens - start)
        out.append((start, length))
        if start + length >= num_tokens:
            return out
        start += min(length, stride)


def _max_context(spans: list[tuple[int, int]], window_index: int, position: int) -> bool:
    """Whether ``position`` (a context token index) has its most context, min(left, right), in this window."""
    best, best_index = None, None
    for i, (start, length) in enumerate(spans):
        if not start <= position < start + length:
            continue
        score = min(position - start, start + length - 1 - position) + 0.01 * length
        if best is None or score > best:
            best, best_index = score, i
    return best_index == window_index


def check_answers(example: SquadExample) -> list[dict]:
    """The answers whose ``answer_start`` points at their text."""
    good = []
    for answer in example.answers:
        start = answer.get("answer_start")
        text = answer.get("text", "")
        if isinstance(start, int) and text and example.context[start : start + len(text)] == text:
            good.append(answer)
    return good


class SquadFeaturizer:
    def __init__(self, tokenizer: Tokenizer, fmt: InputFormat, max_query_len: int, doc_stride: int):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.max_query_len = max_query_len
        self.doc_stride = doc_stride
        self._contexts: dict[str, ContextTokens] = {}

    def context(self, text: str) -> ContextTokens:
        if text not in self._contexts:
            self._contexts[text] = context_tokens(self.tokenizer, text)
        return self._contexts[text]

    def features(self, examples: list[SquadExample], training: bool) -> tuple[list[SquadFeature], SquadStats]:
        stats = SquadStats()
        questions = self.tokenizer.encode([e.question for e in examples])
        out: list[SquadFeature] = []
        for index, (example, q_ids) in enumerate(zip(examples, questions, strict=True)):
            stats.questions += 1
            target = None
            if example.answers:
                good = check_answers(example)
                bad = len(example.answers) - len(good)
                if bad:
                    stats.answer_offset_mismatch += bad
                    if len(stats.mismatched_examples) < 20:
                        stats.mismatched_examples.append(example.qid)
                if training:
                    if not good:
                        stats.skipped_no_valid_answer += 1
                        continue
                    answer = good[0]
                    target = answer_tokens(
                        self.context(example.context),
                        answer["answer_start"],
                        answer["answer_start"] + len(answer["text"]),
                    )
                    if target is None:
                        stats.skipped_no_valid_answer += 1
                        continue
            if len(q_ids) > self.max_query_len:
                stats.questions_truncated += 1
                q_ids = q_ids[: self.max_query_len]
            feats = self._windows(index, q_ids, self.context(example.context), target)
            if len(feats) > 1:
                stats.strided += 1
            if training and target is not None and all(f.start_position == f.null_index for f in feats):
                stats.answer_outside_windows += 1
            out.extend(feats)
        stats.features = len(out)
        return out, stats

    def _windows(self, index: int, q_ids: list[int], ctx: ContextTokens, target) -> list[SquadFeature]:
        fmt = self.fmt
        size = fmt.max_len - len(q_ids) - 3
        spans = windows(len(ctx.ids), size, self.doc_stride)
        out = []
        for w, (start, length) in enumerate(spans):
            input_ids = [fmt.first, *q_ids, fmt.middle, *ctx.ids[start : start + length], fmt.last]
            offset = len(q_ids) + 2
            if fmt.arch == "bert":
                token_type_ids = [0] * offset + [1] * (length + 1)
                null_index = 0
            else:
                token_type_ids = [0] * len(input_ids)
                null_index = len(input_ids) - 1
            feature = SquadFeature(
                example_index=index,
                input_ids=input_ids,
                token_type_ids=token_type_ids,
                context_offset=offset,
                window_start=start,
                window_len=length,
                max_context=[_max_context(spans, w, start + i) for i in range(length)],
                null_index=null_index,
                start_position=null_index,
                end_position=null_index,
            )
            if target is not None and start <= target[0] and target[1] < start + length:
                feature.start_position = offset + target[0] - start
                feature.end_position = offset + target[1] - start
            out.append(feature)
        return out


def emulate_unanswerable(examples: list[SquadExample], fraction: float, seed: int) -> list[SquadExample]:
    """SQuAD 2.0 from a v1.1 set: ``fraction`` of the questions, chosen with ``seed``, are asked of a paragraph
    of another article, where their answer cannot be (needs at least two articles)."""
    if fraction <= 0:
        return examples
    articles = sorted({e.article for e in examples})
    if len(articles) < 2:
        raise ValueError("emulating unanswerable questions needs at least two articles")
    contexts_by_article: dict[int, list[str]] = {}
    for e in examples:
        bucket = contexts_by_article.setdefault(e.article, [])
        if not bucket or bucket[-1] != e.context:
            bucket.append(e.context)
    rng = random.Random(seed)
    out = []
    for e in examples:
        if rng.random() < fraction:
            other = rng.choice([a for a in articles if a != e.article])
            context = rng.choice(contexts_by_article[other])
            out.append(SquadExample(e.qid, e.title, context, e.question, [], True, e.article))
        else:
            out.append(e)
    return out


def _top(logits: np.ndarray, allowed: np.ndarray, n: int) -> list[int]:
    candidates = np.flatnonzero(allowed)
    order = np.argsort(-logits[candidates], kind="stable")[:n]
    return [int(candidates[i]) for i in order]


def postprocess(
    examples: list[SquadExample],
    features: list[SquadFeature],
    start_logits: list[np.ndarray],
    end_logits: list[np.ndarray],
    featurizer: SquadFeaturizer,
    n_best: int,
    max_answer_len: int,
) -> dict[str, dict]:
    """Per question id: ``text`` (best span), ``score``, ``null_score_diff`` (no-answer minus best span;
    ``inf`` without any valid span) and the ``nbest`` list (text, score, probability)."""
    by_example: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        by_example.setdefault(f.example_index, []).append(i)
    results = {}
    for ex_index, feature_ids in by_example.items():
        example = examples[ex_index]
        ctx = featurizer.context(example.context)
        null_score = math.inf
        candidates = []
        for fi in feature_ids:
            f, start, end = features[fi], start_logits[fi], end_logits[fi]
            null_score = min(null_score, float(start[f.null_index] + end[f.null_index]))
            allowed = np.zeros(len(start), dtype=bool)
            allowed[f.context_offset : f.context_offset + f.window_len] = True
            starts, ends = _top(start, allowed, n_best), _top(end, allowed, n_best)
            for s in starts:
                if not f.max_context[s - f.context_offset]:
                    continue
                for e in ends:
                    if e < s or e - s + 1 > max_answer_len:
                        continue
                    first = f.window_start + s - f.context_offset
                    last = f.window_start + e - f.context_offset
                    candidates.append((float(start[s] + end[e]), ctx.spans[first][0], ctx.spans[last][1]))
        candidates.sort(key=lambda c: -c[0])
        nbest, seen = [], set()
        for score, a, b in candidates:
            text = example.context[a:b]
            if text in seen:
                continue
            seen.add(text)
            nbest.append({"text": text, "score": score})
            if len(nbest) >= n_best:
                break
        if nbest:
            scores = np.array([c["score"] for c in nbest])
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            for c, p in zip(nbest, probs, strict=True):
                c["probability"] = float(p)
        best = nbest[0] if nbest else {"text": "", "score": -math.inf}
        results[example.qid] = {
            "text": best["text"],
            "score": best["score"],
            "null_score": null_score,
            "null_score_diff": null_score - best["score"] if nbest else math.inf,
            "nbest": nbest,
        }
    return results


def references(examples: list[SquadExample]) -> dict[str, list[str]]:
    return {e.qid: [a.get("text", "") for a in e.answers] for e in examples}


def duplicate_ids(examples: list[SquadExample]) -> list[str]:
    return [qid for qid, n in Counter(e.qid for e in examples).items() if n > 1]
