"""Checkpoints that are either complete or invisible.

DeepSpeed's ``save_checkpoint`` writes ``latest`` from rank 0 before its barrier, so a crash can publish a tag
whose shards are incomplete. Here every save goes to a new tag directory with ``save_latest=False``; each rank
adds its own state file (RNG states and loader position: DeepSpeed keeps ``client_state`` from rank 0 only);
after a barrier rank 0 copies in the run files that must agree with the checkpoint (fine-tuning's best dev
score), writes ``checkpoint.json`` into the tag (the publication mark) and only then moves
``latest`` with an atomic rename. Loading ignores tags without ``checkpoint.json``. Older published tags beyond
``keep_last`` and unpublished leftovers of crashed saves are deleted after a successful publication.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.signals import ignore_stop_signals

log = logging.getLogger(__name__)

MARK = "checkpoint.json"
LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def published_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every published checkpoint, oldest first."""
    out = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.iterdir():
            mark = d / MARK
            if d.is_dir() and mark.is_file():
                try:
                    out.append((json.loads(mark.read_text())["step"], d.name))
                except (json.JSONDecodeError, KeyError):
                    continue  # a mark that is not complete JSON was never published
    return sorted(out)


def find_checkpoint(spec: str, output_dir: Path) -> Path | None:
    """``auto``: the newest published tag under the run's checkpoints (or None); a path: that tag or the newest
    published tag inside that directory; ``none``: None."""
    if spec == "none":
        return None
    if spec == "auto":
        tags = published_tags(output_dir / "checkpoints")
        return output_dir / "checkpoints" / tags[-1][1] if tags else None
    path = Path(spec)
    if (path / MARK).is_file():
        return path
    if (path / "checkpoints").is_dir():  # a run directory
        path = path / "checkpoints"
    tags = published_tags(path)
    if not tags:
        from pipeline.errors import UserError

        raise UserError(f"{spec}: no published checkpoint ({MARK}) there")
    return path / tags[-1][1]


def read_mark(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MARK).read_text())


def newest_best_tag(ckpt_dir: Path) -> str | None:
    """The newest published tag marked ``best`` (fine-tuning marks each new best dev score), or None."""
    best = [tag for _, tag in published_tags(ckpt_dir) if read_mark(ckpt_dir / tag).get("best")]
    return best[-1] if best else None


class Checkpointer:
    def __init__(self, output_dir: Path, keep_last: int, rank: int, world_size: int):
        self.dir = output_dir / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    def save(self, engine, step: int, client_state: dict, rank_state: dict, mark: dict,
             run_files: dict[str, Path] | None = None) -> Path:  # fmt: skip
        """``run_files``: copies of run files (name in the tag -> path) that rank 0 adds before publishing."""
        tag = tag_for(step)
        tag_dir = self.dir / tag
        t0 = time.time()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        rank_file = tag_dir / f"rank_{self.rank:05d}_state.pt"
        tmp = rank_file.with_name(rank_file.name + ".tmp")
        torch.save({**rank_state, "rng": rng_state()}, tmp)
        os.replace(tmp, rank_file)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            for name, src in (run_files or {}).items():
                if src.is_file():
                    shutil.copyfile(src, tag_dir / name)
            files = sorted(p.name for p in tag_dir.iterdir() if p.is_file())
            expected = {f"rank_{r:05d}_state.pt" for r in range(self.world_size)}
            missing = expected - set(files)
            if missing:  # every rank passed the barrier, so this cannot happen unless the filesystem lies
                raise RuntimeError(f"checkpoint {tag}: missing {sorted(missing)} after the barrier")
            record = {**mark, "step": step, "tag": tag, "world_size": self.world_size, "files": files}
            _atomic_write_text(tag_dir / MARK, json.dumps(record, indent=1, default=str) + "\n")
            _atomic_write_text(self.dir / LATEST, tag)  # DeepSpeed's tools (zero_to_fp32.py) read this name
            self._prune(keep=tag)
        if dist.is_initialized():
            dist.barrier()
        log.info("checkpoint %s saved in %.1f s", tag_dir, time.time() - t0)
        return tag_dir

    def _prune(self, keep: str) -> None:
        published = [tag for _, tag in published_tags(self.dir)]
        best = newest_best_tag(self.dir)  # fine-tuning's best checkpoint outlives keep_last
        for tag in published[: max(0, len(published) - self.keep_last)]:
            if tag != best:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
        # Unpublished directories are debris of saves that crashed before publication.
        for d in self.dir.iterdir():
            if d.is_dir() and d.name.startswith("step_") and not (d / MARK).exists() and d.name != keep:
                shutil.rmtree(d, ignore_errors=True)

    def load_rank_state(self, tag_dir: Path) -> dict | None:
        path = tag_dir / f"rank_{self.rank:05d}_state.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)


def to_universal(tag_dir: Path, rank: int) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (for loading on another world size).

    Rank 0 converts once (into ``<checkpoints>/universal/<tag>``); the others wait for it.
    """
    out = tag_dir.parent / "universal" / tag_dir.name
    done = out / ".complete"
    if rank == 0 and not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]  # fmt: skip
        log.info("converting %s to a universal checkpoint for a new world size", tag_dir)
        # It ignores the job's stop signals, as the loader's workers do: a conversion killed half-way would fail
        # the start; finished, the rank can exit cleanly before its first step.
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=ignore_stop_signals)
        if proc.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        for name in os.listdir(tag_dir):  # our own files travel with it
            if name.startswith("rank_") or name == MARK:
                shutil.copy2(tag_dir / name, out / name)
        done.touch()
    if dist.is_initialized():
        dist.barrier()
    return out


def consolidate_checkpoint(tag_dir: Path, zero_stage: int, model: torch.nn.Module | None = None) -> dict:
    """The fp32 master weights of a DeepSpeed checkpoint tag as one state dict, whatever the precision.

    ZeRO 1-3 through DeepSpeed's ``zero_to_fp32``. ZeRO 0 from the module state, which holds the fp32 weights
    in fp32 training; in bf16/fp16 it holds their rounded copy and the masters are the optimizer's
    ``fp32_groups``, in the order of the trainer's parameter groups: give the ``model`` (same architecture)
    to name them. Without it, such a checkpoint gives its rounded weights (upcast).
    """
    if zero_stage >= 1 or any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()) as chatter:  # it prints progress to stdout
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        log.debug("zero_to_fp32: %s", chatter.getvalue().strip())
        return dict(state)
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    low_precision = any(v.is_floating_point() and v.dtype != torch.float32 for v in saved["module"].values())
    masters = (saved.get("optimizer") or {}).get("fp32_groups")
    if low_precision and masters is not None and model is not None:
        from pipeline.train.engine import param_groups

        ids = {id(p): n for n, p in model.named_parameters()}
        names = [ids[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]
        tensors = [t for group in masters for t in group]
        if len(names) != len(tensors) or any(state[n].shape != t.shape for n, t in zip(names, tensors, strict=False)):
            raise RuntimeError(f"{tag_dir}: its optimizer's fp32 groups do not match this model's parameters")
        state.update({n: t.float() for n, t in zip(names, tensors, strict=True)})
    return state
