"""One job, start to end: read, cut into units, tokenize, build samples, write and commit shards.

Runs in a worker process (or inline with one worker). Everything random is seeded per unit from
``(seed, job, unit)``, so a unit's bytes do not depend on which worker, task or attempt produced it.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.preprocess.bert_pairs import RandomNextPool, UnitTokens, create_unit_pairs
from pipeline.preprocess.config import ShardJobConfig
from pipeline.preprocess.partners import PartnerDocument, PartnerIndex
from pipeline.preprocess.plan import Job, iter_units, job_documents
from pipeline.preprocess.records import (
    UnitCommitter,
    UnitShardWriter,
    job_record_path,
    load_record,
    remove_unit_outputs,
    shards_intact,
    unit_record_path,
    write_json_atomic,
)
from pipeline.preprocess.samples import BERT_FIELD, GPT_FIELD, MLM_FIELD, bert_samples, npy_bytes, npy_columns
from pipeline.preprocess.static_masking import mask_sequence
from pipeline.preprocess.tar_format import numbered_names
from pipeline.text.readers import Document, InputFile, ReadStats
from pipeline.text.sentences import SentenceSplitter, build_splitter
from pipeline.tokenizer.spm import Tokenizer, sha256_file


@dataclass
class WorkerContext:
    cfg: ShardJobConfig
    files: list[InputFile]
    tokenizer: Tokenizer
    out_dir: Path
    partners: PartnerIndex  # where corpus-scope random-next windows may fall
    splitter: SentenceSplitter | None = None  # built per process by init_worker


_CTX: WorkerContext | None = None


def init_worker(ctx: WorkerContext) -> None:
    global _CTX
    ctx.splitter = build_splitter(ctx.cfg.sentences)
    _CTX = ctx


def run_job(job: Job) -> dict:
    """Process ``job`` in the current worker; returns its (committed) job record."""
    assert _CTX is not None, "init_worker was not called"
    return process_job(_CTX, job)


def process_job(ctx: WorkerContext, job: Job) -> dict:
    cfg = ctx.cfg
    stats = ReadStats()
    splitter = ctx.splitter
    cuts_before = getattr(splitter, "num_long_cuts", 0)
    units: list[str] = []
    reused = 0
    tokens = 0
    documents = job_documents(job, ctx.files, cfg.input, stats)
    committer = UnitCommitter()
    try:
        for u, docs in enumerate(iter_units(documents, cfg.data.unit_bytes, cfg.data.min_docs_per_unit)):
            stem = f"{job.stem}-{u:05d}"
            record_path = unit_record_path(ctx.out_dir, stem)
            record = load_record(record_path)
            if record is not None and shards_intact(ctx.out_dir, record["shards"], cfg.run.verify_existing):
                units.append(stem)
                reused += 1
                tokens += record["stats"]["tokens"]
                continue
            prefix = f"{cfg.data.objective}-{stem}"
            record_path.unlink(missing_ok=True)
            remove_unit_outputs(ctx.out_dir, prefix)
            writer = UnitShardWriter(ctx.out_dir, prefix, cfg.output.samples_per_shard)
            if cfg.data.objective == "bert":
                unit_stats = _bert_unit(ctx, job, u, docs, writer)
            else:
                unit_stats = _gpt_unit(ctx, job, u, docs, writer)
            # Shards, then the unit's record, in the background while the next unit is built.
            committer.submit(writer, record_path, {"unit": stem, "shards": [], "stats": unit_stats})
            units.append(stem)
            tokens += unit_stats["tokens"]
    finally:
        committer.shutdown()  # every unit committed (or its error raised) before the job record
    inputs = [
        {"index": i, "path": ctx.files[i].path, "bytes": ctx.files[i].size, "sha256": sha256_file(ctx.files[i].path)}
        for i in job.hashes
    ]
    job_record = {
        "job": job.index,
        "units": units,
        "tokens": tokens,
        "inputs": inputs,
        "read": stats.to_json(),
        "long_sentences_cut": getattr(splitter, "num_long_cuts", 0) - cuts_before,
        "units_reused": reused,
    }
    write_json_atomic(job_record_path(ctx.out_dir, job.stem), job_record, False, None)
    return job_record


def _histogram(lengths, size: int) -> list[int]:
    return np.bincount(np.asarray(lengths, dtype=np.int64), minlength=size + 1)[: size + 1].tolist()


def _partner_sentences(splitter: SentenceSplitter, partner: PartnerDocument) -> list[str]:
    """An excerpt's cut first and last sentences are partial: not sentences of the document."""
    sentences = splitter.split(partner.text)
    return sentences[int(partner.cut_head) : len(sentences) - int(partner.cut_tail)]


def _bert_unit(ctx: WorkerContext, job: Job, unit: int, docs: list[Document], writer: UnitShardWriter) -> dict:
    data = ctx.cfg.data
    tok = ctx.tokenizer
    special = tok.special
    rng = random.Random(f"{data.seed}/{job.index}/{unit}")
    splitter = ctx.splitter
    groups = [splitter.split(d.text) for d in docs]
    num_sentences = sum(len(g) for g in groups)
    partners: list[PartnerDocument] = []
    if data.random_next_scope == "corpus":
        window_rng = random.Random(f"{data.seed}/{job.index}/{unit}/random-next")
        partners = ctx.partners.pool(window_rng, data.random_next_windows, data.random_next_window_bytes)
        cuts = getattr(splitter, "num_long_cuts", None)
        groups += [_partner_sentences(splitter, p) for p in partners]
        if cuts is not None:  # the report counts cuts in the input's own documents only
            splitter.num_long_cuts = cuts
    # One encode call for the unit and its random-next pool; sentences that encode to nothing are dropped.
    encoded = tok.encode([s for g in groups for s in g])
    kept = [ids for ids in encoded if ids]
    counts, k = [], 0
    for g in groups:
        counts.append(sum(1 for ids in encoded[k : k + len(g)] if ids))
        k += len(g)
    sentence_lengths = [len(ids) for ids in kept]
    flat = np.fromiter(itertools.chain.from_iterable(kept), dtype=tok.token_dtype, count=sum(sentence_lengths))
    offsets = [0, *itertools.accumulate(sentence_lengths)]
    unit_counts = counts[: len(docs)]
    with_text = [i for i, c in enumerate(unit_counts) if c]  # a document that encodes to nothing has no pairs
    doc_sentences = [0, *itertools.accumulate(unit_counts[i] for i in with_text)]
    tokens = UnitTokens(flat, offsets, doc_sentences)
    file_index = ctx.partners.file_index
    doc_files = [file_index[docs[i].path] for i in with_text]
    stats: dict = {
        "documents": len(docs),
        "sentences": num_sentences,
        "single_sentence_documents": sum(1 for i in with_text if unit_counts[i] == 1),
        "input_tokens": offsets[doc_sentences[-1]],
    }
    if len(with_text) < len(docs):  # e.g. only characters that SentencePiece normalises away
        stats["documents_without_tokens"] = len(docs) - len(with_text)
    pool = None
    if data.random_next_scope == "corpus":
        in_unit = {(doc_files[j], docs[i].offset): j for j, i in enumerate(with_text)}
        pool = RandomNextPool([], [], [], [])
        first = doc_sentences[-1]
        for partner, count in zip(partners, counts[len(docs) :], strict=True):
            if count:
                pool.first.append(first)
                pool.end.append(first + count)
                pool.unit_index.append(in_unit.get((partner.file, partner.offset), -1))
                pool.files.append(partner.file)
            first += count
        stats["random_next_pool_documents"] = len(pool.first)
        stats["random_next_pool_tokens"] = offsets[first] - offsets[doc_sentences[-1]]
        if not pool.first:  # nothing reachable (or readable) in the input: the unit is its own pool
            stats["random_next_fallback_units"] = 1
            pool = None
    pairs, _ = create_unit_pairs(
        tokens,
        data.seq_len,
        data.short_seq_prob,
        data.random_next_prob,
        data.dupe_factor,
        rng,
        stats,
        pool=pool,
        single_sentence=data.single_sentence_documents,
        files=doc_files,
    )
    samples, bounds = bert_samples(flat, pairs, special.cls, special.sep)
    stem = f"{job.stem}-{unit:05d}"
    lengths = np.diff(bounds) - 1  # input ids per sample (element 0 is the NSP label)
    if data.static_masking:
        _write_static_masked(tok, data, rng, samples, bounds, stem, writer)
    elif len(pairs):
        rows = np.zeros((len(pairs), int(lengths.max()) + 1), dtype=samples.dtype)
        rows[np.arange(rows.shape[1]) <= lengths[:, None]] = samples  # one sample per row, zeros after it
        npy_headers, npy_data, sizes = npy_columns(rows, lengths + 1)
        names = numbered_names(f"{stem}-", len(pairs), f".{BERT_FIELD}")
        writer.write_packed(names, sizes, (npy_headers, npy_data), lengths)
    stats.update(samples=len(pairs), tokens=int(lengths.sum()), random_next=int(pairs.is_random_next.sum()))
    stats["length_histogram"] = _histogram(lengths, data.seq_len)
    return stats


def _write_static_masked(tok: Tokenizer, data, rng: random.Random, samples, bounds, stem, writer) -> None:
    """The original recipe's baked-in masks, drawn per sample in output order (the slow path, by choice)."""
    special = tok.special
    for idx in range(len(bounds) - 1):
        label, *ids = samples[bounds[idx] : bounds[idx + 1]].tolist()
        ids, positions, labels = mask_sequence(
            ids,
            rng,
            masked_lm_prob=data.masked_lm_prob,
            max_predictions=data.max_predictions_per_seq,
            mask_id=special.mask,
            special=tok.special_token_mask,
            word_start=tok.word_start,
            whole_word=data.whole_word_mask,
            vocab_size=tok.vocab_size,
            num_special=special.num_special,
        )
        fields = (
            (BERT_FIELD, npy_bytes(np.array([label, *ids], dtype=samples.dtype))),
            (MLM_FIELD, npy_bytes(np.array([positions, labels], dtype=np.int32).reshape(2, -1))),
        )
        writer.write(f"{stem}-{idx:07d}", fields, len(ids))


def _gpt_unit(ctx: WorkerContext, job: Job, unit: int, docs: list[Document], writer: UnitShardWriter) -> dict:
    data = ctx.cfg.data
    tok = ctx.tokenizer
    encoded = tok.encode([d.text for d in docs])
    eod = (tok.special.eod,)
    count = sum(len(ids) for ids in encoded) + len(encoded)
    stream = itertools.chain.from_iterable(itertools.chain(ids, eod) for ids in encoded)
    arr = np.fromiter(stream, dtype=tok.token_dtype, count=count)
    block = data.seq_len + 1
    num_blocks = max(0, (len(arr) - 1) // data.seq_len)
    if num_blocks:
        rows = np.lib.stride_tricks.sliding_window_view(arr, block)[:: data.seq_len][:num_blocks]
        npy_headers, npy_data, sizes = npy_columns(rows, np.full(num_blocks, block))
        names = numbered_names(f"{job.stem}-{unit:05d}-", num_blocks, f".{GPT_FIELD}")
        writer.write_packed(names, sizes, (npy_headers, npy_data), np.full(num_blocks, block))
    used = num_blocks * data.seq_len + 1 if num_blocks else 0
    return {
        "documents": len(docs),
        "input_tokens": len(arr),
        "samples": num_blocks,
        "tokens": num_blocks * block,
        # The unit's last partial block is not padded: its tokens are counted here, never silently lost.
        "tail_tokens_dropped": len(arr) - used,
        "length_histogram": _histogram([block] * num_blocks, block),
    }
