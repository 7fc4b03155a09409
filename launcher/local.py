"""The local backend: one `torchrun` on this machine starting nproc_per_node ranks."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

TRAIN_ENTRY_MODULE = "framework.train"


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
        """Run torchrun in the foreground; Ctrl-C reaches it (and the ranks) once."""
        proc = subprocess.Popen(command)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            return proc.wait()
