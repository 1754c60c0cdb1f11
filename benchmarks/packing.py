"""Packed vs unpacked BERT pre-training on a corpus of short documents: padding, and real tokens per second.

The corpus is what task-adaptive pre-training reads: the fine-tuning sets' training texts through
``python -m pipeline unlabeled`` (movie snippets, VitaminC, Social IQa, SQuADShifts NYT), a tokenizer trained on
them, sharded at seq 512 with ``--data.single_sentence_documents notnext_pair`` (most of these documents are one
sentence). Then, from the same loader batches (same pairs, same masks):

* ``padding_unpacked`` / ``padding_packed``: the share of the computed positions that are padding, over
  ``--batches`` micro-batches of ``--micro-batch`` pairs;
* ``real_tokens_per_s_ratio``: non-padding tokens per second of the training step (forward, backward, AdamW),
  packed over unpacked, timed in interleaved rounds in this one process (medians);
* with ``--curve-steps N``: two pre-training runs (``python -m pipeline train``, packed and unpacked, dropout
  as configured) of N steps, their MLM and NSP losses plotted against real tokens seen in one PNG.

    python benchmarks/packing.py                              # CPU, bert-tiny, ~10 min on two busy cores
    python benchmarks/packing.py --curve-steps 300 --plot runs/packing.png

One JSON line on stdout. This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's `pipeline`, not an installed one

from pipeline.data import DataConfig, PretrainLoader  # noqa: E402
from pipeline.data.packing import PACKED_KEYS  # noqa: E402
from pipeline.model import build_model, load_model_preset  # noqa: E402

TASKS = ("movie-sentiment", "vitaminc", "social-iqa", "squad11")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/bench-packing", help="corpus, tokenizer, shards, runs (%(default)s)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--preset", default="bert-tiny", help="model of the timed step (%(default)s)")
    p.add_argument("--micro-batch", type=int, default=256, help="pairs per micro-batch (%(default)s)")
    p.add_argument("--batches", type=int, default=50, help="micro-batches counted for padding (%(default)s)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per layout and round (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (%(default)s)")
    p.add_argument("--curve-steps", type=int, default=0, help="also pre-train N steps packed and unpacked (0: no)")
    p.add_argument("--curve-micro-batch", type=int, default=32, help="pairs per step of those runs (%(default)s)")
    p.add_argument("--plot", default="", help="PNG of the two runs' losses against real tokens seen")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cli(*args: str) -> None:
    env = {**os.environ, "PIPELINE_PROGRESS": "0"}
    subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def build_corpus(work: Path, seq_len: int, vocab_size: int) -> Path:
    """unlabeled texts -> tokenizer -> shards (each step skipped when its output exists)."""
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        out = corpus / f"{task}.jsonl"
        if not out.is_file():
            cli("unlabeled", "--config", f"configs/finetune/{task}.yaml", "--output", str(out))
    tok, shards = work / "tokenizer", work / f"shards-{seq_len}"
    if not (tok / "spm.model").is_file():
        cli("tokenizer", "--input", str(corpus), "--vocab-size", str(vocab_size), "--output", str(tok))
    if not (shards / "manifest.json").is_file():
        cli("shard", "--input", str(corpus), "--tokenizer", str(tok), "--output", str(shards), "--objective", "bert",
            "--seq-len", str(seq_len), "--data.single_sentence_documents", "notnext_pair",
            "--data.max_predictions_per_seq", str(max(20, round(seq_len * 0.15))))  # fmt: skip
    return shards


def loader_batches(shards: Path, packing: bool, args) -> list[dict]:
    cfg = DataConfig(shards=str(shards), num_workers=0, packing=packing,
                     max_predictions_per_seq=max(20, round(args.seq_len * 0.15)))  # fmt: skip
    loader = PretrainLoader(cfg, micro_batch_size=args.micro_batch, seed=args.seed)
    out = []
    for batch in loader.iterate(0):
        out.append(batch)
        if len(out) == args.batches:
            break
    return out


def padding_share(batches: list[dict]) -> float:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1.0 - real / sum(b["attention_mask"].numel() for b in batches)


def step_time(model, optimizer, batch: dict) -> float:
    keys = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels", *PACKED_KEYS)
    inputs = {k: batch[k] for k in keys if k in batch}
    if "cu_seqlens" in inputs:
        inputs["max_seqlen"] = int(torch.diff(inputs["cu_seqlens"]).max())
    start = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def throughput(unpacked: list[dict], packed: list[dict], args) -> dict:
    """Real tokens/s of each layout on the same batches, in interleaved rounds; medians of the rounds."""
    cfg = load_model_preset(args.preset, {"vocab_size": args.vocab_size, "max_position_embeddings": args.seq_len,
                                          "fused": "none"})  # fmt: skip
    torch.manual_seed(args.seed)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rates: dict[str, list[float]] = {"unpacked": [], "packed": []}
    step_time(model, optimizer, unpacked[0])  # warm-up
    step_time(model, optimizer, packed[0])
    for r in range(args.rounds):
        for name, batches in (("unpacked", unpacked), ("packed", packed)):
            chosen = [batches[(r * args.steps + i + 1) % len(batches)] for i in range(args.steps)]
            seconds = sum(step_time(model, optimizer, b) for b in chosen)
            rates[name].append(sum(int(b["attention_mask"].sum()) for b in chosen) / seconds)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "real_tokens_per_s_unpacked": round(medians["unpacked"]),
        "real_tokens_per_s_packed": round(medians["packed"]),
        "real_tokens_per_s_ratio": round(medians["packed"] / medians["unpacked"], 3),
        "rounds": {k: [round(x) for x in v] for k, v in rates.items()},
    }


def curves(shards: Path, work: Path, args) -> dict:
    """Two pre-training runs of ``--curve-steps`` steps: the demo recipe (LAMB, poly decay) with bert-tiny's
    sizes, packed and unpacked. The unpacked run pads to each batch's longest pair (``pad_to batch``) to save
    time here; its losses are those of ``pad_to seq_len`` (padding is never attended to)."""
    tiny = load_model_preset("bert-tiny")
    sizes = [f"--model.{k}={getattr(tiny, k)}" for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size")]
    runs = {}
    for packing in ("false", "true"):
        out = work / f"run-packing-{packing}"
        start = time.perf_counter()
        cli("train", "--config", "configs/pretrain/demo.yaml", "--data.shards", str(shards),
            "--train.output_dir", str(out), "--train.max_steps", str(args.curve_steps), "--train.log_every", "10",
            "--train.micro_batch_size", str(args.curve_micro_batch),
            "--train.global_batch_size", str(args.curve_micro_batch), *sizes,
            "--model.max_position_embeddings", str(args.seq_len), "--data.packing", packing,
            "--data.pad_to", "seq_len" if packing == "true" else "batch",
            "--data.max_predictions_per_seq", str(max(20, round(args.seq_len * 0.15))),
            "--checkpoint.every_steps", "0", "--checkpoint.every_minutes", "0", "--checkpoint.resume", "none",
            "--tracking.enabled", "false")  # fmt: skip
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[packing] = {"seconds": round(seconds, 1), "records": records}
    result = {}
    for packing, run in runs.items():
        last = [r for r in run["records"] if "mlm_loss" in r][-1]
        result[f"curve_{'packed' if packing == 'true' else 'unpacked'}"] = {
            "seconds": run["seconds"], "step": last["step"], "mlm_loss": last["mlm_loss"], "nsp_loss": last["nsp_loss"],
        }  # fmt: skip
    if args.plot:
        plot(runs, Path(args.plot))
        result["plot"] = args.plot
    return result


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for packing, run in runs.items():
        recs = [r for r in run["records"] if "mlm_loss" in r]
        tokens = [r["tokens_seen"] for r in recs]
        label = f"{'packed' if packing == 'true' else 'unpacked'} ({run['seconds']:.0f} s)"
        axes[0].plot(tokens, [r["mlm_loss"] for r in recs], label=label)
        axes[1].plot(tokens, [r["nsp_loss"] for r in recs], label=label)
    for ax, name in zip(axes, ("MLM loss", "NSP loss"), strict=True):
        ax.set_xlabel("real tokens seen")
        ax.set_ylabel(name)
        ax.legend()
    fig.suptitle("BERT pre-training on short documents (seq 512): packed vs unpacked")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    args = parse_args(argv)
    work = (REPO / args.work).resolve()
    shards = build_corpus(work, args.seq_len, args.vocab_size)
    manifest = json.loads((shards / "manifest.json").read_text())
    args.vocab_size = manifest["tokenizer"]["vocab_size"]
    unpacked, packed = loader_batches(shards, False, args), loader_batches(shards, True, args)
    result = {
        "seq_len": args.seq_len,
        "preset": args.preset,
        "micro_batch_pairs": args.micro_batch,
        "samples": manifest["totals"]["samples"],
        "mean_pair_tokens": round(manifest["totals"]["tokens"] / manifest["totals"]["samples"], 1),
        "padding_unpacked": round(padding_share(unpacked), 4),
        "padding_packed": round(padding_share(packed), 4),
        "rows_per_batch_packed": round(statistics.mean(len(b["input_ids"]) for b in packed), 2),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }
    result.update(throughput(unpacked, packed, args))
    if args.curve_steps:
        result.update(curves(shards, work, args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
