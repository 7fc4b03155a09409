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

TRAIN_ENTRY_MODULE = "framework.train"
REQUEUE_EXIT_CODE = 75  # the ranks' code for "stopped by a signal after saving; resubmit me"

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
            "torch.distributed.run",
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
        preemption) become a SIGTERM to torchrun, which passes it to the ranks: they finish
        the step and save a checkpoint. REQUEUE_EXIT_CODE only if that checkpoint was
        committed: a requeue after a failed save would silently lose the work since the last."""
        saved_before = newest_complete_step(cfg.run_dir)
        # torchrun has no SIGUSR1 handler, so the default action would kill it and orphan the ranks when
        # a signal reaches the whole process tree (SLURM signals every process of a job step): it starts
        # with SIGUSR1 ignored (inherited); the ranks install their own handler.
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            proc = subprocess.Popen(command, env={**os.environ, **self.environment(cfg)})
        finally:
            signal.signal(signal.SIGUSR1, previous[signal.SIGUSR1])
        signalled = []

        def forward(signum, frame):
            signalled.append(signum)
            proc.send_signal(signal.SIGTERM)  # torchrun's own stop signal: it passes it on to the ranks

        for s in previous:
            signal.signal(s, forward)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if not signalled:
            return code
        saved_after = newest_complete_step(cfg.run_dir)
        if saved_after is not None and (saved_before is None or saved_after > saved_before):
            return REQUEUE_EXIT_CODE
        newest = "none" if saved_after is None else f"step {saved_after}"
        print(
            f"moe-launch: error: stopped by {signal.Signals(signalled[0]).name} but the ranks committed no new "
            f"checkpoint (newest: {newest}; torchrun exit code {code}); not asking for a requeue",
            file=sys.stderr,
            flush=True,
        )
        return code if code not in (0, REQUEUE_EXIT_CODE) else 1
