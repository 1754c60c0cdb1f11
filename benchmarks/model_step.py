"""Training-step throughput of our BERT / GPT against Hugging Face's, and of the fused against the reference path.

One run builds every variant from the same config and the same random weights, then times forward + backward
+ AdamW step on the same batch, in interleaved rounds so that a machine's drift hits every variant alike.
Each result is one JSON line; the comparisons (ratios of median tokens/s) come last.

    python benchmarks/model_step.py                       # bert-mini, seq 128, batch 32, CPU, fp32
    python benchmarks/model_step.py --device cuda --dtype bf16 --preset bert-base

On CUDA it also reports model FLOPs utilisation (``flops_per_token`` x tokens/s over the device's peak; give
``--peak-tflops`` for a GPU it does not know). This is a benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `pipeline`, not an installed one

from pipeline.model import build_model, flops_per_token, load_model_preset
from pipeline.model.hf_convert import to_hf_state_dict

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device-name fragment, for MFU.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bert-mini", help="model preset name or YAML path (default: %(default)s)")
    p.add_argument("--arch", choices=["bert", "gpt"], default=None, help="override the preset's architecture")
    p.add_argument("--vocab-size", type=int, default=30522, help="vocabulary, same for every variant (%(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (%(default)s)")
    p.add_argument("--mlm-prob", type=float, default=0.15, help="share of tokens with an MLM label (%(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (%(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the first round (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; medians reported (%(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype (%(default)s)")
    p.add_argument(
        "--variants",
        default="hf,ours-none,ours-compile",
        help="comma-separated: hf, ours-none (reference path), ours-compile (fused); default: %(default)s",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_batch(cfg, args, device):
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch_size, args.seq_len
    ids = torch.randint(9, cfg.vocab_size, (B, T), generator=g)  # ids >= 9: no special tokens
    batch = {"input_ids": ids, "attention_mask": None}  # unpadded: no mask, as the trainer passes it
    if cfg.arch == "bert":
        batch["token_type_ids"] = (torch.arange(T) >= T // 2).long().expand(B, T).contiguous()
        predicted = torch.rand(B, T, generator=g) < args.mlm_prob
        batch["mlm_labels"] = torch.where(predicted, ids, -100)
        batch["nsp_labels"] = torch.randint(0, 2, (B,), generator=g)
        batch["max_labels"] = int(predicted.sum(1).max())  # known on the host, as in the trainer
    else:
        batch["labels"] = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)  # already shifted
        batch["max_labels"] = T
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_variant(name, cfg, reference_state, device):
    """(model, step_loss_fn) for a variant, all holding the same weights."""
    if name == "hf":
        from transformers import BertForPreTraining, OpenAIGPTLMHeadModel

        from pipeline.model.hf_convert import to_hf_config

        cls = BertForPreTraining if cfg.arch == "bert" else OpenAIGPTLMHeadModel
        model = cls(to_hf_config(cfg))
        model.load_state_dict(to_hf_state_dict(cfg, reference_state))
        if cfg.arch == "bert":

            def loss_fn(b):
                return model(
                    input_ids=b["input_ids"],
                    token_type_ids=b["token_type_ids"],
                    attention_mask=b["attention_mask"],
                    labels=b["mlm_labels"],
                    next_sentence_label=b["nsp_labels"],
                ).loss
        else:

            def loss_fn(b):  # HF shifts internally: give it the unshifted ids
                return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"]).loss
    else:
        fused = name.split("-", 1)[1]
        variant_cfg = type(cfg)(**{**cfg.__dict__, "fused": fused})
        model = build_model(variant_cfg)
        model.load_state_dict(reference_state)
        if cfg.arch == "bert":

            def loss_fn(b):
                return model(
                    b["input_ids"],
                    b["token_type_ids"],
                    b["attention_mask"],
                    b["mlm_labels"],
                    b["nsp_labels"],
                    max_predictions=b["max_labels"],
                ).loss
        else:

            def loss_fn(b):
                return model(b["input_ids"], b["attention_mask"], b["labels"], max_labels_per_row=b["max_labels"]).loss

    model.to(device).train()
    return model, loss_fn


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    overrides = {"vocab_size": args.vocab_size, **({"arch": args.arch} if args.arch else {})}
    cfg = load_model_preset(args.preset, overrides)
    torch.manual_seed(args.seed)
    reference_state = build_model(cfg).state_dict()
    batch = make_batch(cfg, args, device)
    dtype = DTYPES[args.dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext

    variants = {}
    for name in args.variants.split(","):
        model, loss_fn = build_variant(name, cfg, reference_state, device)
        # Same optimizer for all: torch's default (foreach) AdamW; fp16 needs loss scaling, as in training.
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        variants[name] = (loss_fn, optimizer, scaler)

    def step(name):
        loss_fn, optimizer, scaler = variants[name]
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(batch)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    first_loss, compile_s = {}, {}
    for name in variants:  # warm-up (includes torch.compile's compilation)
        t0 = time.perf_counter()
        first_loss[name] = step(name).item()
        for _ in range(args.warmup - 1):
            step(name)
        sync()
        compile_s[name] = time.perf_counter() - t0
    rates = {name: [] for name in variants}
    tokens = args.batch_size * args.seq_len * args.steps
    for _ in range(args.rounds):
        for name in variants:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            sync()
            rates[name].append(tokens / (time.perf_counter() - t0))

    fpt = flops_per_token(cfg, args.seq_len, args.mlm_prob)
    peak = args.peak_tflops
    if peak is None and device.type == "cuda" and dtype is not None:
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    common = {
        "preset": args.preset,
        "arch": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "device": device.type,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
    }
    medians = {}
    for name, r in rates.items():
        medians[name] = statistics.median(r)
        line = {
            **common,
            "variant": name,
            "tokens_per_s": round(medians[name], 1),
            "tokens_per_s_rounds": [round(x, 1) for x in r],
            "step_ms": round(1000 * args.batch_size * args.seq_len / medians[name], 2),
            "first_loss": round(first_loss[name], 4),
            "warmup_s": round(compile_s[name], 2),
            "tflops": round(medians[name] * fpt / 1e12, 4),
        }
        if peak:
            line["mfu"] = round(medians[name] * fpt / (peak * 1e12), 4)
        print(json.dumps(line), flush=True)
    for ours in ("ours-none", "ours-compile"):
        if "hf" in medians and ours in medians:
            ratio = medians[ours] / medians["hf"]
            print(json.dumps({**common, "compare": f"{ours}/hf", "speedup": round(ratio, 3)}), flush=True)
    if "ours-none" in medians and "ours-compile" in medians:
        ratio = medians["ours-compile"] / medians["ours-none"]
        print(json.dumps({**common, "compare": "ours-compile/ours-none", "speedup": round(ratio, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
