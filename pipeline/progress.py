"""Progress bars that behave on a terminal and in batch logs (SLURM output files, CI)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar on stderr: redrawn twice a second on a terminal, one line every 30 s in a log file.

    ``PIPELINE_PROGRESS=0`` turns bars off (tests, nested runs).
    """
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", os.environ.get("PIPELINE_PROGRESS", "1") == "0")
    return tqdm(file=sys.stderr, **kwargs)
