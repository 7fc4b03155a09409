"""torchrun (torch.distributed.run) as the launcher starts it: same arguments, but a failed rank's
own exit code comes back (2 no checkpoint, 3 non-finite, ...) instead of 1 and a page of traceback.

Run as `python -m launcher.torchrun ARGS`; torch is imported only inside main(), in that process.
"""

from __future__ import annotations

import logging
import signal
import sys

SIGNAL_EXIT_BASE = 128  # the shell's convention: killed by signal N -> 128 + N
QUIET_RANK_CODES = (2, 3, 75)  # the ranks printed their own one-line reason for these


def exit_code_of(rank_exitcode: int) -> int:
    """A rank's exit status as a process exit code (a negative status is a signal)."""
    return SIGNAL_EXIT_BASE - rank_exitcode if rank_exitcode < 0 else rank_exitcode


# After a stop signal the agent logs one line per step of its shutdown; the ranks' own line
# ("stopped by signal after step N; checkpoint saved ...") already says what happened.
SHUTDOWN_LOGS = {
    "torch.distributed.elastic.agent.server.api": "death signal",
    "torch.distributed.elastic.multiprocessing.api": "closing signal",
}


def _quiet_shutdown_logs() -> None:
    for name, phrase in SHUTDOWN_LOGS.items():
        logging.getLogger(name).addFilter(lambda record, phrase=phrase: phrase not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    _quiet_shutdown_logs()
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = exit_code_of(failure.exitcode)
        if failure.exitcode < 0:
            reason = f"was killed by {failure.signal_name()}"
        else:
            reason = f"exited with code {failure.exitcode}"
        if failure.exitcode not in QUIET_RANK_CODES:
            print(f"moe-launch: error: rank {rank} {reason}; its output is above", file=sys.stderr, flush=True)
        return code
    except SignalException as err:  # the agent was told to stop; it has stopped the ranks
        return SIGNAL_EXIT_BASE + signal.Signals(err.sigval).value
    return 0


if __name__ == "__main__":
    sys.exit(main())
