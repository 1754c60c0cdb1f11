"""Summarise, verify and decode a shard directory.

Prints the shards, samples and tokens, the NSP balance (BERT) and a histogram of sample lengths.
--verify re-hashes every shard against manifest.json; --decode N --json prints N samples as JSON lines
(BERT: tokens_a, tokens_b, is_random_next, text_a, text_b; GPT: tokens, text).

examples:
  python -m pipeline inspect shards/
  python -m pipeline inspect shards/ --verify
  python -m pipeline inspect shards/ --decode 3 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.preprocess.manifest import load_manifest
from pipeline.preprocess.report import format_read_problems, partner_distances, single_sentence_summary
from pipeline.preprocess.samples import GPT_FIELD, npy_load, parse_bert
from pipeline.progress import progress_bar
from pipeline.tokenizer.spm import sha256_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a shard directory (with manifest.json)")
    parser.add_argument("--verify", action="store_true", help="re-hash every shard and compare with the manifest")
    parser.add_argument("--decode", type=int, default=0, metavar="N", help="print the first N samples")
    parser.add_argument("--json", action="store_true", help="with --decode: one JSON object per line, nothing else")
    parser.add_argument("--tokenizer", help="tokenizer directory for --decode (default: the one in the manifest)")
    parser.add_argument("--plot", metavar="PNG", help="also save the length histogram as a PNG")
    parser.add_argument("--bins", type=int, default=16, help="histogram bins in the text summary")


def length_bins(histogram: list[int], bins: int) -> list[tuple[int, int, int]]:
    """(lo, hi, count) buckets of a per-length histogram, over the range of lengths that occur."""
    hist = np.asarray(histogram, dtype=np.int64)
    nonzero = np.flatnonzero(hist)
    if nonzero.size == 0:
        return []
    lo, hi = int(nonzero[0]), int(nonzero[-1])
    edges = np.linspace(lo, hi + 1, min(bins, hi - lo + 1) + 1).astype(int)
    return [(int(a), int(b) - 1, int(hist[a:b].sum())) for a, b in itertools.pairwise(edges)]


def summary_lines(manifest: dict, bins: int) -> list[str]:
    totals, stats = manifest["totals"], manifest["stats"]
    tok = manifest["tokenizer"]
    lines = [
        f"objective {manifest['objective']}, seq_len {manifest['seq_len']}, seed {manifest['seed']}, "
        f"ids {manifest['token_dtype']}, tokenizer {tok['sha256'][:12]} (vocab {tok['vocab_size']})",
        f"shards {totals['shards']}, samples {totals['samples']}, tokens {totals['tokens']}, "
        f"{totals['bytes'] / 1e6:.1f} MB, from {len(manifest['inputs'])} input files",
    ]
    read = stats.get("read", {})
    data = manifest.get("config", {}).get("data", {})
    lines.append(
        f"documents {read.get('counts', {}).get('documents', 0)}"
        + (f", sentences {stats['sentences']}" if stats.get("sentences") else "")
        + (
            f", {single_sentence_summary(stats, data.get('single_sentence_documents'))}"
            if stats.get("sentences")
            else ""
        )
    )
    lines += format_read_problems(read)
    if manifest["objective"] == "bert" and totals["samples"]:
        nn = stats.get("random_next", 0)
        lines.append(
            f"NSP: IsNext {totals['samples'] - nn} ({1 - nn / totals['samples']:.1%}), "
            f"NotNext {nn} ({nn / totals['samples']:.1%})"
        )
        partners = partner_distances(stats)
        if partners:
            lines.append(f"{partners} (random_next_scope {data.get('random_next_scope', 'unit')})")
    buckets = length_bins(stats.get("length_histogram", []), bins)
    if buckets:
        top = max(c for _, _, c in buckets) or 1
        lines.append("sample length (tokens):")
        for lo, hi, count in buckets:
            bar = "#" * max(0, round(40 * count / top))
            lines.append(f"  {lo:>5}-{hi:<5} {count:>9}  {bar}")
    return lines


def verify(directory: Path, manifest: dict) -> list[str]:
    problems = []
    with progress_bar(total=len(manifest["shards"]), desc="verify", unit="shard") as bar:
        for shard in manifest["shards"]:
            path = directory / shard["name"]
            if not path.is_file():
                problems.append(f"missing: {shard['name']}")
            elif path.stat().st_size != shard["bytes"]:
                problems.append(f"size mismatch: {shard['name']} ({path.stat().st_size} != {shard['bytes']})")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"sha256 mismatch: {shard['name']}")
            bar.update(1)
    return problems


def iter_decoded(directory: Path, manifest: dict, tokenizer, limit: int):
    """The first ``limit`` samples in manifest order, decoded to tokens and text."""
    import webdataset as wds

    urls = [str(directory / s["name"]) for s in manifest["shards"] if s["samples"]]
    if not urls or limit <= 0:
        return
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    sep = manifest["tokenizer"]["special_ids"]["sep"]
    for n, sample in enumerate(dataset):
        if n >= limit:
            break
        if manifest["objective"] == "bert":
            bert = parse_bert(sample, sep)
            ids, len_a = bert["input_ids"].astype(np.int64), bert["len_a"]
            tokens_a = ids[1 : 1 + len_a].tolist()
            tokens_b = ids[2 + len_a : -1].tolist()
            record = {
                "key": sample["__key__"],
                "tokens_a": tokens_a,
                "tokens_b": tokens_b,
                "is_random_next": bert["is_random_next"],
                "text_a": tokenizer.decode(tokens_a),
                "text_b": tokenizer.decode(tokens_b),
                "num_tokens": len(ids),
            }
            if "masked_positions" in bert:
                record["masked_positions"] = bert["masked_positions"].tolist()
                record["masked_labels"] = bert["masked_labels"].tolist()
        else:
            ids = npy_load(sample[GPT_FIELD]).astype(np.int64).tolist()
            record = {"key": sample["__key__"], "tokens": ids, "text": tokenizer.decode(ids), "num_tokens": len(ids)}
        yield record


def plot_lengths(manifest: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = manifest["stats"].get("length_histogram", [])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(hist)), hist, width=1.0, color="#4c72b0")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(
        f"{manifest['objective']} samples, seq_len {manifest['seq_len']} ({manifest['totals']['samples']} total)"
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    manifest = load_manifest(directory)
    if args.decode:
        from pipeline.tokenizer.spm import Tokenizer

        tokenizer = Tokenizer(args.tokenizer or manifest["tokenizer"]["path"])
        if tokenizer.sha256 != manifest["tokenizer"]["sha256"]:
            raise UserError(f"tokenizer {tokenizer.directory} is not the one these shards were written with")
        for record in iter_decoded(directory, manifest, tokenizer, args.decode):
            if args.json:
                print(json.dumps(record, ensure_ascii=False))
            else:
                print({k: v for k, v in record.items() if not k.startswith("tokens")})
        if args.json:
            return 0
    for line in summary_lines(manifest, args.bins):
        print(line)
    status = 0
    if args.verify:
        problems = verify(directory, manifest)
        if problems:
            print(f"verify: {len(problems)} problem(s)")
            for p in problems:
                print(f"  {p}")
            status = 1
        else:
            print(f"verify: all {len(manifest['shards'])} shards match their sha256")
    if args.plot:
        plot_lengths(manifest, args.plot)
        print(f"length histogram: {args.plot}")
    sys.stdout.flush()
    return status
