"""LAMB on every DeepSpeed path on several ranks against the reference (tests/lamb_paths.py).

Launched with torchrun (2 ranks on CPU in tests/test_lamb.py; 1 on a single GPU in tests/test_gpu.py). Rank 0
prints one JSON line: {"<stage>-<precision>": largest |difference|, ..., "2-fp32-no-layout": ...}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
os.environ.setdefault("DS_ACCELERATOR", "cuda" if CUDA else "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lamb_paths import compare_paths  # noqa: E402

deepspeed.init_distributed("nccl" if CUDA else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if CUDA else torch.device("cpu")
if CUDA:
    torch.cuda.set_device(device)
diffs = compare_paths(["fp32", "bf16"] + (["fp16"] if CUDA else []), rank, world, device)
if rank == 0:
    print(json.dumps(diffs), flush=True)
dist.destroy_process_group()
# Native threads of the gloo stack sometimes abort the interpreter's shutdown ("terminate called without an
# active exception", SIGABRT) after all the work is done; leave without running static destructors.
os._exit(0)
