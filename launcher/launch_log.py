"""The run's launch log, RUN_DIR/launches.jsonl: one line per start and exit of a launch.

The local launcher writes it from Python, a SLURM batch script with printf (same fields); status and report read it.
The file names of a run's launch records (this log, the submitted SLURM job's record) live here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from launcher.jsonl import read_jsonl
from launcher.local import REQUEUE_EXIT_CODE

LAUNCH_LOG = "launches.jsonl"
JOB_FILE = "slurm_job.json"  # the submitted SLURM job's id, script and log, for status and cancel


def record(run_dir: str | Path, event: str, code: int = 0) -> None:
    """Append one event ("start" or "exit"); a local launch has no job id and restart count 0."""
    line = {"event": event, "job_id": 0, "restart_count": 0, "nodes": 1, "code": code, "time": int(time.time())}
    line["pid"] = os.getpid()
    path = Path(run_dir) / LAUNCH_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def read(run_dir: str | Path) -> list[dict]:
    """Every event so far; a line cut short by a crash is skipped."""
    return read_jsonl(Path(run_dir) / LAUNCH_LOG)


def describe_exit(code: int) -> str:
    """A launch's exit code in words."""
    if code == 0:
        return "completed"
    if code == REQUEUE_EXIT_CODE:
        return "stopped by a signal after saving a checkpoint (requeue to resume)"
    if code > 128:
        return f"killed by signal {code - 128}"
    return f"failed (exit code {code})"
