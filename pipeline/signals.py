"""The signals that ask a run to stop, and what the processes around a rank do about them.

SLURM's pre-emption warning (SIGUSR1), its time limit and ``scancel`` (SIGTERM) and Ctrl-C (SIGINT) reach every
process of a job, not only the rank: the data loader's workers and any helper a rank runs get them too. A rank
turns them into "checkpoint at the next step, then exit 0" (``pipeline.train.policy.StopFlags``); the processes
that work for it ignore them (``ignore_stop_signals``) and are ended by the rank when it is done with them.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(*_args) -> None:
    """Make this process deaf to the stop signals (a DataLoader ``worker_init_fn``, a ``preexec_fn``).

    A worker that died of the job's SIGTERM would fail the rank's next batch ("DataLoader worker is killed by
    signal") before the rank could write its checkpoint. Such a process must be ended by its owner: its
    loader's shutdown, or SIGKILL. Signals held back while it started (``stop_signals_blocked``) are dropped.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals back from this thread while it starts processes that will ignore them.

    A child inherits the mask, so a signal sent to the whole job while a child is still starting waits until it
    has made itself deaf (``ignore_stop_signals``) instead of killing it: torch's own SIGTERM handler in a
    DataLoader worker, in place until then, exits at once. This process still gets its signals: another of its
    threads takes them, or this one when the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
