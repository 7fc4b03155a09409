"""The local backend: one `torchrun` on this machine starting nproc_per_node ranks."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

TRAIN_ENTRY_MODULE = "framework.train"
REQUEUE_EXIT_CODE = 75  # the ranks' code for "stopped by a signal after saving; resubmit me"


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

    def launch(self, command: list[str]) -> int:
        """Run torchrun in the foreground. SIGTERM/SIGUSR1 (what SLURM sends before
        preemption) become a SIGTERM to torchrun, which passes it to the ranks: they finish
        the step, save a checkpoint, and this returns REQUEUE_EXIT_CODE."""
        proc = subprocess.Popen(command)
        signalled = []

        def forward(signum, frame):
            signalled.append(signum)
            proc.send_signal(signal.SIGTERM)  # torchrun has no SIGUSR1 handler of its own

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return REQUEUE_EXIT_CODE if signalled else code
