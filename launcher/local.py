"""The local backend: one `torchrun` on this machine starting nproc_per_node ranks."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from checkpoint.commit import newest_complete_step
from framework.exit_codes import INTERRUPTED_EXIT_CODE, REQUEUE_EXIT_CODE

TRAIN_ENTRY_MODULE = "framework.train"
AGENT_MODULE = "launcher.torchrun"  # torchrun, reporting a failed rank's own exit code
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

# torchrun's agent shares its rendezvous TCPStore with the ranks by default, and keys outlive a
# restart round: a restarted rank can read a dead peer's gloo/NCCL address from the round before
# and fail with "connection refused" (pytorch/pytorch#135712). With this set, rank 0 of each round
# hosts a fresh store on a new port, so every restart starts from an empty store.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class LocalLauncher:
    """Builds and runs the torchrun command; the SLURM backend will wrap the same command."""

    def command(self, cfg: DictConfig, config_path: Path) -> list[str]:
        launch = cfg.launcher
        return [
            sys.executable,
            "-m",
            AGENT_MODULE,
            "--standalone",
            f"--nnodes={launch.nnodes}",
            f"--nproc-per-node={launch.nproc_per_node}",
            f"--max-restarts={launch.max_restarts}",
            "-m",
            TRAIN_ENTRY_MODULE,
            "--config",
            str(config_path),
        ]

    def environment(self, cfg: DictConfig) -> dict[str, str]:
        """Variables set for torchrun on top of the caller's environment."""
        # torchrun's grace between passing a SIGTERM on and killing the ranks
        return {**TORCHRUN_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(cfg.launcher.stop_timeout_s)}

    def preview(self, cfg: DictConfig, config_path: Path) -> str:
        """What --dry-run prints before the config: the command line with its environment."""
        env = [f"{k}={v}" for k, v in self.environment(cfg).items()]
        return shlex.join(["env", *env, *self.command(cfg, config_path)])

    def launch(self, cfg: DictConfig, command: list[str], stop: StopSignals | None = None) -> int:
        """Run torchrun in the foreground. SIGTERM/SIGUSR1 (what SLURM sends before
        preemption), Ctrl-C and a hang-up become one SIGTERM to torchrun, which passes it to
        the ranks: they finish the step and save a checkpoint. torchrun runs in its own session
        so a Ctrl-C in the terminal reaches only this process (not torchrun, which would pass a
        SIGINT on and every rank would print a KeyboardInterrupt traceback).
        REQUEUE_EXIT_CODE (INTERRUPTED_EXIT_CODE for Ctrl-C) only if that checkpoint was
        committed: a requeue after a failed save would silently lose the work since the last.
        Otherwise the ranks' own exit code (launcher.torchrun passes it on). `stop`: signals
        caught since before the run dir was written (cli.train); a stop that came before the
        start starts nothing."""
        if stop is None:  # not through cli.train (a sweep point, a SLURM node): catch from here
            stop = StopSignals()
            with stop.catching():
                return self.launch(cfg, command, stop)
        saved_before = newest_complete_step(cfg.run_dir)
        if stop.signalled:
            code = None
        else:
            torchrun = subprocess.Popen(
                command,
                env={**os.environ, **self.environment(cfg)},
                start_new_session=True,
                preexec_fn=ignore_sigusr1,
            )
            stop.started(torchrun, cfg.launcher.stop_timeout_s)
            code = torchrun.wait()
        if not stop.signalled:
            return code
        saved_after = newest_complete_step(cfg.run_dir)
        if saved_after is not None and (saved_before is None or saved_after > saved_before):
            return INTERRUPTED_EXIT_CODE if stop.signalled[0] == signal.SIGINT else REQUEUE_EXIT_CODE
        newest = "none" if saved_after is None else f"step {saved_after}"
        how = "torchrun not started" if code is None else f"torchrun exit code {code}"
        print(
            f"moe-launch: error: stopped by {signal.Signals(stop.signalled[0]).name} but the ranks committed no new "
            f"checkpoint (newest: {newest}; {how}); not asking for a requeue",
            file=sys.stderr,
            flush=True,
        )
        return 1 if code in (None, 0, REQUEUE_EXIT_CODE, INTERRUPTED_EXIT_CODE) else code


class StopSignals:
    """SIGTERM, SIGUSR1, SIGINT and SIGHUP, recorded from the moment `catching` is entered (the
    CLI enters it before it writes the run dir, so no signal falls in a gap and kills this
    process silently), the first forwarded as one SIGTERM to torchrun once it runs."""

    def __init__(self) -> None:
        self.signalled: list[int] = []
        self.torchrun: subprocess.Popen | None = None
        self.forwarded = False
        self.stop_timeout_s: float | None = None

    @contextmanager
    def catching(self) -> Iterator[StopSignals]:
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def started(self, torchrun: subprocess.Popen, stop_timeout_s: float) -> None:
        self.torchrun, self.stop_timeout_s = torchrun, stop_timeout_s
        self._forward_once()  # a signal that came while it was starting

    def _forward_once(self) -> None:
        if self.torchrun is not None and self.signalled and not self.forwarded:
            self.forwarded = True
            self.torchrun.send_signal(signal.SIGTERM)  # torchrun has no SIGUSR1 handler of its own

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled.append(signum)
        if len(self.signalled) == 1:
            self._forward_once()
        elif self.torchrun is not None:
            print(
                f"moe-launch: stopping: the ranks finish the step and save (killed after "
                f"launcher.stop_timeout_s={self.stop_timeout_s} s)",
                file=sys.stderr,
                flush=True,
            )


def ignore_sigusr1() -> None:
    """In torchrun's process before exec: SLURM signals every process of a job step, and
    torchrun has no SIGUSR1 handler, so the default action would kill it and orphan the ranks
    while they save. Ignored is inherited; the ranks install their own handler."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
