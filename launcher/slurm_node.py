"""The one task per node of a SLURM job: runs torchrun through the local launcher's signal handling.

A stop signal becomes a SIGTERM to torchrun; exit 75 ("requeue me") only if the ranks committed a checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from framework.config import load_run_config
from launcher.local import LocalLauncher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="RUN_DIR/config.yaml written by moe-launch")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the torchrun command for this node")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no torchrun command after --")
    return LocalLauncher().launch(load_run_config(args.config), command)


if __name__ == "__main__":
    sys.exit(main())
