"""One job, start to end: read, cut into units, tokenize, build samples, write and commit shards.

Runs in a worker process (or inline with one worker). Everything random is seeded per unit from
``(seed, job, unit)``, so a unit's bytes do not depend on which worker, task or attempt produced it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.preprocess.bert_pairs import RandomNextPool, create_unit_instances
from pipeline.preprocess.config import ShardJobConfig
from pipeline.preprocess.partners import PartnerDocument, PartnerIndex
from pipeline.preprocess.plan import Job, iter_units, job_documents
from pipeline.preprocess.records import (
    UnitShardWriter,
    job_record_path,
    load_record,
    remove_unit_outputs,
    shards_intact,
    unit_record_path,
    write_json_atomic,
)
from pipeline.preprocess.samples import bert_record, gpt_record
from pipeline.preprocess.static_masking import mask_sequence
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
        shards = writer.commit()
        write_json_atomic(record_path, {"unit": stem, "shards": shards, "stats": unit_stats})
        units.append(stem)
        tokens += unit_stats["tokens"]
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
    write_json_atomic(job_record_path(ctx.out_dir, job.stem), job_record)
    return job_record


def _histogram(lengths: list[int], size: int) -> list[int]:
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
    sentence_lists = [splitter.split(d.text) for d in docs]
    partners: list[PartnerDocument] = []
    partner_lists: list[list[str]] = []
    if data.random_next_scope == "corpus":
        window_rng = random.Random(f"{data.seed}/{job.index}/{unit}/random-next")
        partners = ctx.partners.pool(window_rng, data.random_next_windows, data.random_next_window_bytes)
        cuts = getattr(splitter, "num_long_cuts", None)
        partner_lists = [_partner_sentences(splitter, p) for p in partners]
        if cuts is not None:  # the report counts cuts in the input's own documents only
            splitter.num_long_cuts = cuts
    encoded = tok.encode([s for sentences in (*sentence_lists, *partner_lists) for s in sentences])
    documents: list[list[list[int]]] = []
    k = 0
    for sentences in sentence_lists:
        documents.append([ids for ids in encoded[k : k + len(sentences)] if ids])
        k += len(sentences)
    num_sentences = k
    input_tokens = sum(len(ids) for ids in encoded[:k])
    file_index = ctx.partners.file_index
    kept = [i for i, d in enumerate(documents) if d]
    doc_files = [file_index[docs[i].path] for i in kept]
    stats: dict = {"documents": len(docs), "sentences": num_sentences, "input_tokens": input_tokens}
    if len(kept) < len(documents):  # e.g. only characters that SentencePiece normalises away
        stats["documents_without_tokens"] = len(documents) - len(kept)
    documents = [documents[i] for i in kept]
    stats["single_sentence_documents"] = sum(1 for d in documents if len(d) == 1)
    pool = None
    if data.random_next_scope == "corpus":
        in_unit = {(doc_files[j], docs[i].offset): j for j, i in enumerate(kept)}
        pool = RandomNextPool([], [], [])
        for partner, sentences in zip(partners, partner_lists, strict=True):
            ids = [x for x in encoded[k : k + len(sentences)] if x]
            k += len(sentences)
            if ids:
                pool.documents.append(ids)
                pool.unit_index.append(in_unit.get((partner.file, partner.offset), -1))
                pool.files.append(partner.file)
        stats["random_next_pool_documents"] = len(pool.documents)
        stats["random_next_pool_tokens"] = sum(len(x) for d in pool.documents for x in d)
        if not pool.documents:  # nothing reachable (or readable) in the input: the unit is its own pool
            stats["random_next_fallback_units"] = 1
            pool = None
    instances, _ = create_unit_instances(
        documents,
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
    dtype = tok.token_dtype
    lengths: list[int] = []
    random_next = 0
    cls, sep = special.cls, special.sep
    for idx, inst in enumerate(instances):
        ids = [cls, *inst.tokens_a, sep, *inst.tokens_b, sep]
        mlm = None
        if data.static_masking:
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
            mlm = [positions, labels]
        writer.write(bert_record(f"{job.stem}-{unit:05d}-{idx:07d}", inst.is_random_next, ids, dtype, mlm), len(ids))
        lengths.append(len(ids))
        random_next += inst.is_random_next
    stats.update(samples=len(instances), tokens=sum(lengths), random_next=random_next)
    stats["length_histogram"] = _histogram(lengths, data.seq_len)
    return stats


def _gpt_unit(ctx: WorkerContext, job: Job, unit: int, docs: list[Document], writer: UnitShardWriter) -> dict:
    data = ctx.cfg.data
    tok = ctx.tokenizer
    encoded = tok.encode([d.text for d in docs])
    stream: list[int] = []
    for ids in encoded:
        stream.extend(ids)
        stream.append(tok.special.eod)
    arr = np.array(stream, dtype=tok.token_dtype)
    block = data.seq_len + 1
    num_blocks = max(0, (len(arr) - 1) // data.seq_len)
    for b in range(num_blocks):
        start = b * data.seq_len
        writer.write(gpt_record(f"{job.stem}-{unit:05d}-{b:07d}", arr[start : start + block]), block)
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
