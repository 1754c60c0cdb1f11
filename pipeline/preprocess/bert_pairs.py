"""BERT sentence pairs with next-sentence labels, as in Google's ``create_pretraining_data.py``.

Per document (documents shuffled first, then ``dupe_factor`` passes):

- the target length is ``seq_len - 3`` (room for [CLS] and two [SEP]); with probability ``short_seq_prob`` it is
  drawn uniformly from ``[2, seq_len - 3]`` instead, once per document as in the original;
- sentences are gathered into a chunk until it reaches the target length (or the document ends);
- A is the first ``1..k-1`` sentences of the chunk (``k >= 2``);
- B is, with probability ``random_next_prob`` (or always when the chunk holds one sentence), a run of
  sentences from a random start in a *different* random document of the random-next pool, up to the remaining
  length (NotNext, ``is_random_next = 1``), and the chunk's unused sentences are put back to start the next
  chunk; otherwise B is the rest of the chunk (IsNext);
- while the pair is too long, the longer segment loses a token at its front or back, chosen at random.

A pair is four token offsets into the unit's flat token array (A and B are each a contiguous run of one
document's sentences), so no token is copied until the samples are assembled in one numpy gather
(``samples.bert_samples``). Truncation counts the tokens each segment loses in closed form and draws all of
its front-or-back coin flips at once (``getrandbits``): the same distribution as the original's draw per
token, a fraction of its cost. tests/test_bert_pairs.py checks the whole algorithm against a plain
list-of-tokens transcription of the original.

The random-next pool is the unit's own documents (``random_next_scope unit``) or documents read at seeded
places anywhere in the input (``corpus``, see ``partners.py``): Google's draws from all documents of its input,
which a memory-bounded sharder cannot hold. A single-sentence document either starts no pair of its own and is
only random-next material (``random_next_only``), or, as in the original, is segment A of a pair whose B is
random-next text (``notnext_pair``; always NotNext). Where each NotNext partner came from (the same unit, the
same file, another file) is counted in the shard statistics.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np


@dataclass
class UnitTokens:
    """A unit's token ids, flat: sentence ``s`` is ``flat[offsets[s]:offsets[s + 1]]`` (never empty) and
    document ``d`` is sentences ``doc_sentences[d]`` up to ``doc_sentences[d + 1]``."""

    flat: np.ndarray
    offsets: list[int]
    doc_sentences: list[int]

    @property
    def num_documents(self) -> int:
        return len(self.doc_sentences) - 1

    @classmethod
    def from_documents(cls, documents: list[list[list[int]]], dtype=np.int64) -> UnitTokens:
        """From ``documents[d][s]``, the token list of sentence ``s`` of document ``d`` (empty ones dropped)."""
        sentences = [sentence for doc in documents for sentence in doc if sentence]
        lengths = [len(sentence) for sentence in sentences]
        flat = np.fromiter(itertools.chain.from_iterable(sentences), dtype=dtype, count=sum(lengths))
        counts = [sum(1 for sentence in doc if sentence) for doc in documents]
        return cls(flat, [0, *itertools.accumulate(lengths)], [0, *itertools.accumulate(counts)])


@dataclass
class RandomNextPool:
    """The documents NotNext segments are drawn from, as sentence ranges of the unit's ``UnitTokens``
    (``first[r]`` up to ``end[r]``), with, for each, the index of the same document among the unit's (-1 when
    it is not one of them) and its input file."""

    first: list[int]
    end: list[int]
    unit_index: list[int]
    files: list[int]


@dataclass
class Pairs:
    """A unit's pairs, in output order: A is ``flat[a_start:a_end]``, B ``flat[b_start:b_end]``."""

    a_start: np.ndarray
    a_end: np.ndarray
    b_start: np.ndarray
    b_end: np.ndarray
    is_random_next: np.ndarray
    doc: np.ndarray  # A's document: its index in the unit's shuffled document order
    random_doc: np.ndarray  # B's document in the random-next pool when is_random_next, else -1

    def __len__(self) -> int:
        return len(self.a_start)


SINGLE_SENTENCE_MODES = ("random_next_only", "notnext_pair")
PARTNER_DISTANCES = (
    "random_next_same_document",
    "random_next_same_unit",
    "random_next_same_file",
    "random_next_other_file",
)


def trim_counts(len_a: int, len_b: int, max_num_tokens: int) -> tuple[int, int]:
    """Tokens the original's loop removes from A and from B ("while too long, trim the longer; B on ties")."""
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return 0, 0
    if len_a > len_b:
        first = min(len_a - len_b, excess)  # A alone until the two are equal, then B, A, B, ...
        rest = excess - first
        return first + rest // 2, (rest + 1) // 2
    first = min(len_b - len_a + 1, excess)  # B alone until it is one shorter than A, then A, B, A, ...
    rest = excess - first
    return (rest + 1) // 2, first + rest // 2


def truncate_pair(a: tuple[int, int], b: tuple[int, int], max_num_tokens: int, rng: random.Random):
    """Trim the spans ``a`` and ``b`` to ``max_num_tokens`` in all: each removed token comes off the front or
    the back of its segment with equal odds (noise against learning where segments are cut). Returns the new
    spans and the number of tokens removed."""
    remove_a, remove_b = trim_counts(a[1] - a[0], b[1] - b[0], max_num_tokens)
    front_a = rng.getrandbits(remove_a).bit_count()
    front_b = rng.getrandbits(remove_b).bit_count()
    return (
        (a[0] + front_a, a[1] - (remove_a - front_a)),
        (b[0] + front_b, b[1] - (remove_b - front_b)),
        remove_a + remove_b,
    )


def create_unit_pairs(
    tokens: UnitTokens,
    seq_len: int,
    short_seq_prob: float,
    random_next_prob: float,
    dupe_factor: int,
    rng: random.Random,
    stats: dict,
    pool: RandomNextPool | None = None,
    single_sentence: str = "random_next_only",
    files: list[int] | None = None,
) -> tuple[Pairs, list[int]]:
    """All pairs of a unit's documents (the first ``tokens.num_documents``, each of >= 1 sentence), shuffled.

    ``pool``: where NotNext segments come from (default: the unit's documents, in their shuffled order).
    ``files``: each document's input file (for the partner-distance statistics). Returns the pairs and the
    document order used (for provenance).
    """
    assert single_sentence in SINGLE_SENTENCE_MODES, single_sentence
    num_docs = tokens.num_documents
    offsets, doc_sentences = tokens.offsets, tokens.doc_sentences
    lengths = [offsets[s + 1] - offsets[s] for s in range(len(offsets) - 1)]
    files = files if files is not None else [0] * num_docs
    order = list(range(num_docs))
    rng.shuffle(order)
    if pool is None:
        pool = RandomNextPool(
            [doc_sentences[k] for k in order], [doc_sentences[k + 1] for k in order], order, [files[k] for k in order]
        )
    pool_first, pool_end, pool_unit, pool_files = pool.first, pool.end, pool.unit_index, pool.files
    last_pool = len(pool_first) - 1
    max_num_tokens = seq_len - 3
    skip_singles = single_sentence == "random_next_only"
    rand, below = rng.random, rng._randbelow

    def randint(a: int, b: int) -> int:
        # rng.randint(a, b) is a + rng._randbelow(b - a + 1) after two layers of argument checks (CPython's
        # randrange); called once or twice per pair, those layers were a tenth of BERT sharding. Same stream.
        if b < a:
            raise ValueError(f"empty range for randint({a}, {b})")
        return a + below(b - a + 1)

    out: list[tuple[int, int, int, int, int, int, int]] = []
    distance = dict.fromkeys(PARTNER_DISTANCES, 0)
    single_pairs = truncated_pairs = truncated_tokens = 0

    for _ in range(dupe_factor):
        for d, doc_id in enumerate(order):
            first, end = doc_sentences[doc_id], doc_sentences[doc_id + 1]
            single = end - first < 2
            if single and skip_singles:
                continue  # random-next material only
            made = len(out)
            doc_file = files[doc_id]
            target_seq_length = max_num_tokens
            if rand() < short_seq_prob:
                target_seq_length = randint(2, max_num_tokens)
            chunk_start = first  # the chunk is sentences chunk_start..i
            current_length = 0
            i = first
            while i < end:
                current_length += lengths[i]
                if i == end - 1 or current_length >= target_seq_length:
                    n = i - chunk_start + 1
                    a_end_sentence = chunk_start + (randint(1, n - 1) if n >= 2 else 1)
                    a = (offsets[chunk_start], offsets[a_end_sentence])
                    if n == 1 or rand() < random_next_prob:
                        is_random_next = 1
                        target_b_length = target_seq_length - (a[1] - a[0])
                        for _ in range(10):  # a document other than A's own: ten tries, as the original
                            r = randint(0, last_pool)
                            if pool_unit[r] != doc_id:
                                break
                        if pool_unit[r] == doc_id:  # a pool that holds only A's document
                            distance["random_next_same_document"] += 1
                        elif pool_unit[r] >= 0:
                            distance["random_next_same_unit"] += 1
                        elif pool_files[r] == doc_file:
                            distance["random_next_same_file"] += 1
                        else:
                            distance["random_next_other_file"] += 1
                        j = randint(pool_first[r], pool_end[r] - 1)  # the random start sentence
                        b_length = 0
                        b_first = j
                        while j < pool_end[r]:
                            b_length += lengths[j]
                            j += 1
                            if b_length >= target_b_length:
                                break
                        b = (offsets[b_first], offsets[j])
                        # The unused sentences go back, so that no text of this document is wasted.
                        i = a_end_sentence - 1
                    else:
                        is_random_next = 0
                        r = -1
                        b = (a[1], offsets[i + 1])
                    a, b, removed = truncate_pair(a, b, max_num_tokens, rng)
                    if removed:
                        truncated_pairs += 1
                        truncated_tokens += removed
                    out.append((a[0], a[1], b[0], b[1], is_random_next, d, r))
                    chunk_start = i + 1
                    current_length = 0
                i += 1
            if single:
                single_pairs += len(out) - made

    permutation = list(range(len(out)))
    rng.shuffle(permutation)
    columns = np.array(out, dtype=np.int64).reshape(-1, 7)[permutation]
    for key, count in distance.items():
        if count:
            stats[key] = stats.get(key, 0) + count
    if truncated_pairs:
        stats["truncated_pairs"] = stats.get("truncated_pairs", 0) + truncated_pairs
        stats["truncated_tokens"] = stats.get("truncated_tokens", 0) + truncated_tokens
    if single_pairs:
        stats["single_sentence_pairs"] = stats.get("single_sentence_pairs", 0) + single_pairs
    return Pairs(*(np.ascontiguousarray(columns[:, k]) for k in range(7))), order
