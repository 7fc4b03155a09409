"""The local backend: one `torchrun` on this machine starting nproc_per_node ranks."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
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

    def launch(self, cfg: DictConfig, command: list[str]) -> int:
        """Run torchrun in the foreground. SIGTERM/SIGUSR1 (what SLURM sends before
        preemption), Ctrl-C and a hang-up become one SIGTERM to torchrun, which passes it to
        the ranks: they finish the step and save a checkpoint. torchrun runs in its own session
        so a Ctrl-C in the terminal reaches only this process (not torchrun, which would pass a
        SIGINT on and every rank would print a KeyboardInterrupt traceback).
        REQUEUE_EXIT_CODE (INTERRUPTED_EXIT_CODE for Ctrl-C) only if that checkpoint was
        committed: a requeue after a failed save would silently lose the work since the last.
        Otherwise the ranks' own exit code (launcher.torchrun passes it on)."""
        saved_before = newest_complete_step(cfg.run_dir)
        signalled, started, forwarded = [], [], []

        def forward_once() -> None:
            if started and signalled and not forwarded:
                forwarded.append(True)
                started[0].send_signal(signal.SIGTERM)  # torchrun has no SIGUSR1 handler of its own

        def forward(signum, frame):
            signalled.append(signum)
            if len(signalled) == 1:
                forward_once()  # before torchrun started: right after it starts, below
            else:
                print(
                    f"moe-launch: stopping: the ranks finish the step and save (killed after "
                    f"launcher.stop_timeout_s={cfg.launcher.stop_timeout_s} s)",
                    file=sys.stderr,
                    flush=True,
                )

        previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}  # before the start: no gap
        try:
            started.append(
                subprocess.Popen(
                    command,
                    env={**os.environ, **self.environment(cfg)},
                    start_new_session=True,
                    preexec_fn=ignore_sigusr1,
                )
            )
            forward_once()
            code = started[0].wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if not signalled:
            return code
        saved_after = newest_complete_step(cfg.run_dir)
        if saved_after is not None and (saved_before is None or saved_after > saved_before):
            return INTERRUPTED_EXIT_CODE if signalled[0] == signal.SIGINT else REQUEUE_EXIT_CODE
        newest = "none" if saved_after is None else f"step {saved_after}"
        print(
            f"moe-launch: error: stopped by {signal.Signals(signalled[0]).name} but the ranks committed no new "
            f"checkpoint (newest: {newest}; torchrun exit code {code}); not asking for a requeue",
            file=sys.stderr,
            flush=True,
        )
        return code if code not in (0, REQUEUE_EXIT_CODE, INTERRUPTED_EXIT_CODE) else 1


def ignore_sigusr1() -> None:
    """In torchrun's process before exec: SLURM signals every process of a job step, and
    torchrun has no SIGUSR1 handler, so the default action would kill it and orphan the ranks
    while they save. Ignored is inherited; the ranks install their own handler."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
