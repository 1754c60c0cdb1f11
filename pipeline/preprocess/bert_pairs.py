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

The random-next pool is the unit's own documents (``random_next_scope unit``) or documents read at seeded
places anywhere in the input (``corpus``, see ``partners.py``): Google's draws from all documents of its input,
which a memory-bounded sharder cannot hold. A single-sentence document either starts no pair of its own and is
only random-next material (``random_next_only``), or, as in the original, is segment A of a pair whose B is
random-next text (``notnext_pair``; always NotNext). Where each NotNext partner came from (the same unit, the
same file, another file) is counted in the shard statistics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class PairInstance:
    tokens_a: list[int]
    tokens_b: list[int]
    is_random_next: int
    doc: int  # index of A's document in the unit's (shuffled) document list
    random_doc: int  # index of B's document in the random-next pool when is_random_next, else -1


@dataclass
class RandomNextPool:
    """The documents NotNext segments are drawn from (sentences' token ids each), with, for each, the index of
    the same document among the unit's (-1 when it is not one of them) and its input file."""

    documents: list[list[list[int]]]
    unit_index: list[int]
    files: list[int]


SINGLE_SENTENCE_MODES = ("random_next_only", "notnext_pair")


def truncate_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: random.Random) -> int:
    """Trim the pair to ``max_num_tokens`` in place; returns the number of tokens removed.

    Same rule and same random draws as the original (one draw per removed token, taken from the longer
    segment, front or back with equal odds: noise against learning where segments are cut), but each
    segment is sliced once at the end instead of popping token by token from the front of a list.
    """
    len_a, len_b = len(tokens_a), len(tokens_b)
    front = [0, 0]  # removals from the front of A, B
    back = [0, 0]
    removed = 0
    while len_a + len_b > max_num_tokens:
        which = 0 if len_a > len_b else 1
        if rng.random() < 0.5:
            front[which] += 1
        else:
            back[which] += 1
        if which == 0:
            len_a -= 1
        else:
            len_b -= 1
        removed += 1
    if removed:
        for tokens, f, b in ((tokens_a, front[0], back[0]), (tokens_b, front[1], back[1])):
            if f or b:
                tokens[:] = tokens[f : len(tokens) - b]
    return removed


def _draw_partner(pool: RandomNextPool, doc_id: int, doc_file: int, rng: random.Random, stats: dict) -> int:
    """A random pool document other than A's own (ten tries, as the original), counted by its distance."""
    for _ in range(10):
        r = rng.randint(0, len(pool.documents) - 1)
        if pool.unit_index[r] != doc_id:
            break
    if pool.unit_index[r] == doc_id:  # a pool that holds only A's document
        kind = "random_next_same_document"
    elif pool.unit_index[r] >= 0:
        kind = "random_next_same_unit"
    elif pool.files[r] == doc_file:
        kind = "random_next_same_file"
    else:
        kind = "random_next_other_file"
    stats[kind] = stats.get(kind, 0) + 1
    return r


def create_instances(
    document: list[list[int]],
    document_index: int,
    doc_id: int,
    doc_file: int,
    pool: RandomNextPool,
    seq_len: int,
    short_seq_prob: float,
    random_next_prob: float,
    rng: random.Random,
    stats: dict,
) -> list[PairInstance]:
    """Pairs from one document: ``document[s]`` is the token list of its sentence ``s``; ``doc_id`` is its index
    in the unit as read (what ``pool.unit_index`` refers to), ``document_index`` its place after shuffling."""
    max_num_tokens = seq_len - 3
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    instances: list[PairInstance] = []
    current_chunk: list[list[int]] = []
    current_length = 0
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
            if current_chunk:
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = rng.randint(1, len(current_chunk) - 1)
                tokens_a: list[int] = []
                for j in range(a_end):
                    tokens_a.extend(current_chunk[j])

                tokens_b: list[int] = []
                random_doc = -1
                if len(current_chunk) == 1 or rng.random() < random_next_prob:
                    is_random_next = 1
                    target_b_length = target_seq_length - len(tokens_a)
                    random_doc = _draw_partner(pool, doc_id, doc_file, rng, stats)
                    random_document = pool.documents[random_doc]
                    random_start = rng.randint(0, len(random_document) - 1)
                    for j in range(random_start, len(random_document)):
                        tokens_b.extend(random_document[j])
                        if len(tokens_b) >= target_b_length:
                            break
                    # The unused sentences go back, so that no text of this document is wasted.
                    i -= len(current_chunk) - a_end
                else:
                    is_random_next = 0
                    for j in range(a_end, len(current_chunk)):
                        tokens_b.extend(current_chunk[j])
                removed = truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
                if removed:
                    stats["truncated_pairs"] = stats.get("truncated_pairs", 0) + 1
                    stats["truncated_tokens"] = stats.get("truncated_tokens", 0) + removed
                if tokens_a and tokens_b:
                    instances.append(PairInstance(tokens_a, tokens_b, is_random_next, document_index, random_doc))
                else:  # only possible with empty sentences, which the splitter never yields
                    stats["empty_segment_pairs"] = stats.get("empty_segment_pairs", 0) + 1
            current_chunk = []
            current_length = 0
        i += 1
    return instances


def create_unit_instances(
    documents: list[list[list[int]]],
    seq_len: int,
    short_seq_prob: float,
    random_next_prob: float,
    dupe_factor: int,
    rng: random.Random,
    stats: dict,
    pool: RandomNextPool | None = None,
    single_sentence: str = "random_next_only",
    files: list[int] | None = None,
) -> tuple[list[PairInstance], list[int]]:
    """All pairs of a unit, shuffled. Returns the instances and the document order used (for provenance).

    ``documents`` must each hold at least one sentence. ``pool``: where NotNext segments come from (default:
    the unit's documents, in their shuffled order). ``files``: each document's input file (for the statistics).
    """
    assert single_sentence in SINGLE_SENTENCE_MODES, single_sentence
    files = files if files is not None else [0] * len(documents)
    order = list(range(len(documents)))
    rng.shuffle(order)
    shuffled = [documents[k] for k in order]
    if pool is None:
        pool = RandomNextPool(shuffled, order, [files[k] for k in order])
    instances: list[PairInstance] = []
    for _ in range(dupe_factor):
        for d in range(len(shuffled)):
            single = len(shuffled[d]) < 2
            if single and single_sentence == "random_next_only":
                continue  # random-next material only
            made = create_instances(
                shuffled[d], d, order[d], files[order[d]], pool, seq_len, short_seq_prob, random_next_prob, rng, stats
            )
            if single:
                stats["single_sentence_pairs"] = stats.get("single_sentence_pairs", 0) + len(made)
            instances.extend(made)
    rng.shuffle(instances)
    return instances, order
