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

USER_ERROR = 2  # pipeline.cli's exit status for ConfigError / UserError (and argparse's for bad arguments)


def _user_error_ranks(failures: dict) -> list[int]:
    return sorted(rank for rank, failure in failures.items() if getattr(failure, "exitcode", None) == USER_ERROR)


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
        print(f"torchrun: rank {', '.join(map(str, ranks))} exited with status {USER_ERROR} (an error to fix, shown "
              "above): not restarted", file=sys.stderr)  # fmt: skip
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
