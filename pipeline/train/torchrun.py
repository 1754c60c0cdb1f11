"""torchrun that does not restart a user error: ``python -m pipeline.train.torchrun`` takes torchrun's arguments.

torchrun restarts the worker group after any failed rank (``--max-restarts``): right for a crash, a lost node or
a kill, useless for a deterministic user error (a missing file, a config that cannot work), which fails again
each time and prints its message once per attempt. The pipeline's commands exit with status 2 for exactly
those errors (``pipeline.cli``), so here a failure in which a rank exited with 2 ends the job at once, and this
launcher exits with 2 itself (torchrun would exit 1), which launch/torchrun.sh and the SLURM job pass on.

Everything else is torchrun's own ``main``; only the elastic agent's check of its workers is wrapped.
"""

from __future__ import annotations

import sys
from pathlib import Path

USER_ERROR = 2  # pipeline.cli's exit status for ConfigError / UserError (and argparse's for bad arguments)


def _user_error_ranks(failures: dict) -> list[int]:
    return sorted(rank for rank, failure in failures.items() if getattr(failure, "exitcode", None) == USER_ERROR)


def _stderr_on_console(args):
    """For a local rank, whether torchrun shows its stderr on the console: from torchrun's parsed arguments (and
    PET_* variables), as its ``--tee`` / ``--redirects`` (a stream or a per-rank mapping) and
    ``--local-ranks-filter`` (which filters teed output) mean it."""
    from torch.distributed.elastic.multiprocessing import Std

    tee, redirects = Std.from_str(args.tee), Std.from_str(args.redirects)
    shown = {int(r) for r in args.local_ranks_filter.split(",")} if args.local_ranks_filter else None

    def has_stderr(std, local_rank: int) -> bool:
        std = std.get(local_rank, Std.NONE) if isinstance(std, dict) else std
        return bool(std.value & Std.ERR.value)

    def on_console(local_rank: int) -> bool:
        if has_stderr(tee, local_rank):
            return shown is None or local_rank in shown
        return not has_stderr(redirects, local_rank)

    return on_console


def _show_hidden_errors(failures: dict, argv: list[str]) -> None:
    """A user error printed by a rank whose output went only to its log file (``--local-ranks-filter``): its last
    lines on the console, unless a rank on the console failed the same way (its message is there already)."""
    from torch.distributed import run as torchrun

    args = torchrun.parse_args(argv)
    on_console = _stderr_on_console(args)
    failed = [failures[rank] for rank in _user_error_ranks(failures)]
    if any(on_console(f.local_rank) for f in failed):
        return
    for failure in failed[:1]:  # the same check failed on every rank: once is enough
        log_file = _rank_log(failure, args.log_dir)
        if log_file is not None:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-20:]
            print(f"torchrun: local rank {failure.local_rank} ({log_file}):", *tail, sep="\n  ", file=sys.stderr)


def _rank_log(failure, log_dir: str | None) -> Path | None:
    """A failed rank's stderr.log: beside its error file, or, for a rank that wrote none (torch then gives its
    error file as '<N/A>'), its newest attempt's under torchrun's --log-dir (<dir>/<run>/attempt_<n>/<rank>/)."""
    candidates = []
    if failure.error_file and Path(failure.error_file).is_absolute():
        candidates.append(Path(failure.error_file).parent / "stderr.log")
    if log_dir:
        found = Path(log_dir).glob(f"*/attempt_*/{failure.local_rank}/stderr.log")
        candidates += sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if p.is_file()), None)


def _no_restart_after_user_error() -> None:
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers

    def monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and _user_error_ranks(result.failures):
            # SimpleElasticAgent._invoke_run restarts while this is > 0: the group is stopped instead.
            self._remaining_restarts = 0
        return result

    LocalElasticAgent._monitor_workers = monitor_workers


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _no_restart_after_user_error()
    try:
        torchrun.main(argv)
    except ChildFailedError as exc:
        ranks = _user_error_ranks(exc.failures)
        if not ranks:
            raise
        _show_hidden_errors(exc.failures, sys.argv[1:] if argv is None else argv)
        print(f"torchrun: rank {', '.join(map(str, ranks))} exited with status {USER_ERROR} (an error to fix, shown "
              "above): not restarted", file=sys.stderr)  # fmt: skip
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
