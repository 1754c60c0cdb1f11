"""Train a SentencePiece tokenizer (unigram or BPE) with the project's fixed special-token ids.

Reads the same inputs as `shard` (files, directories, globs; .txt, .jsonl[.gz], .parquet), splits documents
into sentences, trains on a seeded sample of at most --tokenizer.max_sentences sentences, and writes
spm.model, spm.vocab, tokenizer_meta.json (special ids, sha256) and config.yaml into --output.

Special ids: 0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP], 4 [MASK], 5 [START], 6 [DELIM], 7 [EXTRACT], 8 [EOD].

example:
  python -m pipeline tokenizer --input data_shards/demo_corpus --vocab-size 8000 --output runs/tok
"""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, config_from_args
from pipeline.tokenizer.train import TokenizerJobConfig, train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TokenizerJobConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(TokenizerJobConfig, args)
    meta = train_tokenizer(cfg)
    report = meta["report"]
    counts = report["read"]["counts"]
    print(
        f"tokenizer: {cfg.output}  vocab {meta['vocab_size']} ({meta['model_type']})  sha256 {meta['sha256'][:16]}\n"
        f"  files {report['files']}, documents {counts.get('documents', 0)}, "
        f"sentences {report['sentences_seen']} (trained on {report['sentences_sampled']}), "
        f"{meta['seconds']} s"
    )
    skipped = {k: v for k, v in counts.items() if k not in ("documents", "bytes", "files_read")}
    ignored = report["ignored_paths"]["count"]
    if skipped or ignored:
        print(f"  not used: {skipped or 'no documents'}; {ignored} paths of other formats; see tokenizer_meta.json")
    return 0
