"""One short run on a GPU machine: model throughput and MFU, DeepSpeed trainer steps, loader rate.

Prints one JSON line per measurement, each with "check" naming its section:

- model: tokens/s and MFU of bert-base and bert-large at seq 128 and 512 in bf16 and fp16; ours eager
  (``ours-none``), ours with compiled fused kernels (``ours-compile``) and transformers' ``BertForPreTraining``
  (``hf``) in the same run, plus their ratios (benchmarks/model_step.py, interleaved rounds);
- trainer: 50 steps of ``run_training`` (bert-base, LAMB) through DeepSpeed ZeRO 1 and 2 in bf16 and fp16:
  loss and loss-scale traces, skipped steps, tokens/s, MFU, and the ratio of the trainer's samples/s to the
  bare model step's (same model, batch and dtype, measured in this run; goal >= 0.95);
- loader: samples/s of one rank's ``PretrainLoader`` with 8 workers (BERT, seq 128, batch 64).

``--cpu-smoke`` runs the same code at toy sizes on a CPU (bert-tiny, seq 32-64, bf16 only, 3 trainer steps,
2 loader workers), so that CI keeps this script working. Sections share a time budget (``--budget-s``); a
section that would not fit prints {"check": ..., "skipped": "time budget"}.

usage: python benchmarks/gpu_check.py [--cpu-smoke] [--budget-s 360] [--work DIR]
Run through benchmarks/gpu_check.sh, which installs the wheels of `make gpu-wheels` first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("PIPELINE_PROGRESS", "0")

import torch  # noqa: E402

CORPUS = REPO / "data_shards" / "demo_corpus" / "sotu_1900-2021.jsonl.gz"

FULL = {
    "model": [(p, t, d) for p in ("bert-large", "bert-base") for t in (128, 512) for d in ("bf16", "fp16")],
    "model_batch": {128: 64, 512: 16},
    "model_steps": ["--steps", "10", "--warmup", "3", "--rounds", "3"],
    "trainer": [(z, p) for z in (1, 2) for p in ("bf16", "fp16")],
    "trainer_preset": "bert-base",
    "trainer_steps": 50,
    "trainer_batch": 64,
    "trainer_workers": 4,
    "seq_len": 128,
    "vocab": 8000,
    "loader_workers": 8,
    "loader_seconds": 10.0,
}
SMOKE = {
    "model": [("bert-tiny", 32, "bf16")],
    "model_batch": {32: 4},
    "model_steps": ["--steps", "2", "--warmup", "1", "--rounds", "1"],
    "trainer": [(1, "bf16")],
    "trainer_preset": "bert-tiny",
    "trainer_steps": 3,
    "trainer_batch": 8,
    "trainer_workers": 1,
    "seq_len": 64,
    "vocab": 2000,
    "loader_workers": 2,
    "loader_seconds": 2.0,
}
# Rough seconds a section needs at full size (compilation included): skipped when less budget is left.
NEEDS = {"model": 25.0, "trainer": 30.0, "loader": 15.0}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


class Budget:
    def __init__(self, seconds: float, smoke: bool):
        self.deadline = time.monotonic() + seconds
        self.smoke = smoke

    def allows(self, section: str) -> bool:
        return self.smoke or self.deadline - time.monotonic() > NEEDS[section]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, check=True, capture_output=True, text=True)


def model_step(argv: list[str]) -> list[dict]:
    """benchmarks/model_step.py in this process; its JSON lines."""
    import model_step as bench

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main(argv)
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def check_model(sizes: dict, budget: Budget, device: str) -> None:
    for preset, seq, dtype in sizes["model"]:
        if not budget.allows("model"):
            emit({"check": "model", "preset": preset, "seq_len": seq, "dtype": dtype, "skipped": "time budget"})
            continue
        argv = ["--preset", preset, "--seq-len", str(seq), "--batch-size", str(sizes["model_batch"][seq]),
                "--dtype", dtype, "--device", device, "--variants", "hf,ours-none,ours-compile",
                *sizes["model_steps"]]  # fmt: skip
        for line in model_step(argv):
            emit({"check": "model", **line})


def build_data(work: Path, sizes: dict) -> Path:
    tok, shards = work / "tok", work / f"shards-{sizes['seq_len']}"
    if not (shards / "manifest.json").is_file():
        cli("tokenizer", "--input", str(CORPUS), "--vocab-size", str(sizes["vocab"]), "--output", str(tok),
            "--overwrite")  # fmt: skip
        cli("shard", "--input", str(CORPUS), "--tokenizer", str(tok), "--output", str(shards), "--objective",
            "bert", "--seq-len", str(sizes["seq_len"]), "--workers", str(min(8, os.cpu_count() or 1)),
            "--overwrite")  # fmt: skip
    return shards


def check_trainer(sizes: dict, budget: Budget, shards: Path, work: Path, info) -> None:
    from pipeline.config import build_config
    from pipeline.data.loader import PretrainLoader
    from pipeline.data.shards import open_shard_set
    from pipeline.train.config import TrainJobConfig
    from pipeline.train.loop import run_training
    from pipeline.train.pretrain import PretrainTask, model_config_for_shards

    preset, batch, seq = sizes["trainer_preset"], sizes["trainer_batch"], sizes["seq_len"]
    bare: dict[str, float] = {}
    for zero, precision in sizes["trainer"]:
        head = {"check": "trainer", "preset": preset, "zero_stage": zero, "precision": precision, "optim": "lamb"}
        if not budget.allows("trainer"):
            emit({**head, "skipped": "time budget"})
            continue
        out = work / f"train-z{zero}-{precision}"
        config = work / f"{preset}.yaml"
        config.write_text(
            f"include: [{REPO / 'configs/pretrain/debug.yaml'}, {REPO / 'configs/model' / preset}.yaml]\n"
        )
        cfg = build_config(TrainJobConfig, config, {
            "data.shards": str(shards), "data.num_workers": sizes["trainer_workers"], "train.output_dir": str(out),
            "train.max_steps": sizes["trainer_steps"], "train.micro_batch_size": batch,
            "train.global_batch_size": batch * info.world_size, "train.precision": precision,
            "train.zero_stage": zero, "train.log_every": 1, "train.loss_curve": False,
            "deepspeed.config": str(REPO / f"configs/deepspeed/zero{zero}.json"), "optim.name": "lamb",
            "optim.lr": 1e-3, "tracking.enabled": False, "checkpoint.every_steps": 0, "checkpoint.every_minutes": 0,
            "checkpoint.resume": "none",
        })  # fmt: skip
        shard_set = open_shard_set(cfg.data.shards)
        cfg.model = model_config_for_shards(cfg.model, shard_set)
        loader = PretrainLoader(cfg.data, micro_batch_size=batch, rank=info.rank, world_size=info.world_size,
                                seed=cfg.train.seed, shard_set=shard_set)  # fmt: skip
        task = PretrainTask(cfg.model, loader, shard_set, info.device)
        t0 = time.perf_counter()
        result = run_training(task, info, train=cfg.train, optim=cfg.optim, schedule=cfg.schedule,
                              checkpoint=cfg.checkpoint, tracking=cfg.tracking,
                              deepspeed_json=cfg.deepspeed.config, full_config=cfg)  # fmt: skip
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steady = records[len(records) // 5 :] or records  # after start-up (compilation, first batches)
        samples_per_s = statistics.median(r["samples_per_s"] for r in steady)
        line = {
            **head, "steps": result["step"], "wall_s": round(wall, 1), "micro_batch": batch, "seq_len": seq,
            "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
            "skipped_overflow": result["skipped_overflow"], "skipped_nonfinite": result["skipped_nonfinite"],
            "samples_per_s": round(samples_per_s, 2),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady), 1),
        }  # fmt: skip
        if "mfu" in records[-1]:
            line["mfu"] = round(statistics.median(r["mfu"] for r in steady), 4)
        if precision == "fp16":
            line["loss_scale"] = [r.get("loss_scale") for r in records]
        # The bare model step, same model, batch, sequence and dtype (model_step.py's AdamW step, compiled
        # fused kernels as the trainer uses on a GPU): what the loader, DeepSpeed and LAMB cost on top.
        key = precision
        if key not in bare:
            variant = "ours-compile" if info.device.type == "cuda" else "ours-none"
            lines = model_step(["--preset", preset, "--seq-len", str(seq), "--batch-size", str(batch), "--dtype",
                                precision, "--device", info.device.type, "--variants", variant,
                                "--vocab-size", str(cfg.model.vocab_size), *sizes["model_steps"]])  # fmt: skip
            bare[key] = next(r["tokens_per_s"] for r in lines if r.get("variant") == variant) / seq  # samples/s
        line["bare_samples_per_s"] = round(bare[key], 2)
        line["ratio_to_bare"] = round(samples_per_s / bare[key], 3)
        emit(line)


def check_loader(sizes: dict, budget: Budget, shards: Path) -> None:
    from pipeline.data import DataConfig, PretrainLoader

    workers = sizes["loader_workers"]
    head = {"check": "loader", "workers": workers, "micro_batch": 64, "seq_len": sizes["seq_len"]}
    if not budget.allows("loader"):
        emit({**head, "skipped": "time budget"})
        return
    loader = PretrainLoader(DataConfig(shards=str(shards), num_workers=workers), micro_batch_size=64, seed=1)
    count, t0, started = 0, None, time.perf_counter()
    for _ in loader:  # endless, epoch after epoch
        if t0 is None:  # timed from the first batch: worker start-up is reported apart
            t0, startup = time.perf_counter(), time.perf_counter() - started
            continue
        count += 64
        if time.perf_counter() - t0 >= sizes["loader_seconds"]:
            break
    emit({**head, "samples_per_s": round(count / (time.perf_counter() - t0), 1), "startup_s": round(startup, 2)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (CI)")
    parser.add_argument("--budget-s", type=float, default=360.0, help="seconds for all sections (%(default)s)")
    parser.add_argument("--work", default="", help="working directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.cpu_smoke else FULL
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        parser.error("no CUDA device: run with --cpu-smoke for the toy-size check")
    budget = Budget(args.budget_s, args.cpu_smoke)
    from pipeline.train.engine import init_distributed

    info = init_distributed()
    import deepspeed

    emit({"check": "env", "torch": torch.__version__, "deepspeed": deepspeed.__version__,
          "device": torch.cuda.get_device_name() if cuda else "cpu", "cuda": torch.version.cuda,
          "cpu_count": os.cpu_count(), "smoke": args.cpu_smoke})  # fmt: skip
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        check_model(sizes, budget, "cuda" if cuda else "cpu")
        shards = build_data(work, sizes)
        check_trainer(sizes, budget, shards, work, info)
        check_loader(sizes, budget, shards)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
