"""What a command prints: its result on stdout, everything else on stderr.

The training commands end with one JSON line on stdout that scripts read (``... | tail -1 | jq``). Libraries
print to stdout too (DeepSpeed's "... built successfully", a JIT build's compiler lines): while the command
works, their output goes to stderr, and stdout holds the command's result alone.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[None]:
    """Send stdout to stderr while the body runs, for Python's ``print`` and for the file descriptor (what C++
    code and child processes write). The command prints its result after the block."""
    sys.stdout.flush()
    try:
        real_fd = sys.stdout.fileno() == 1  # not a test's StringIO nor a capture's temporary file
    except (AttributeError, ValueError, io.UnsupportedOperation):
        real_fd = False
    saved = os.dup(1) if real_fd else None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
