"""The real local SLURM for tests: started by scripts/local_slurm.sh, or the test is skipped with the
reason (a failure instead when MOE_LAUNCH_REQUIRE_SLURM=1, as in CI); helpers to wait on jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_slurm.sh"
BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "slurmctld", "slurmd", "munged")
# The tiny model, one process per node, a few steps: each job trains in seconds.
TINY = [
    "train",
    "config=tiny",
    "launcher=slurm",
    "launcher.nproc_per_node=1",
    "launcher.gpus_per_node=0",
    "data=synthetic",
    "logging.wandb.mode=disabled",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_batches=1",
]


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        reason = f"SLURM is not installed (no {', '.join(missing)}); run `scripts/local_slurm.sh install`"
        if os.environ.get("MOE_LAUNCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"MOE_LAUNCH_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    out = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm_job.json").read_text())["job_id"]


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True)
    fields = dict(t.split("=", 1) for t in out.stdout.split() if "=" in t)
    return fields[name]


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_end(job: str, timeout: float = 240) -> str:
    """The job's final state (COMPLETED, FAILED, ...), once it has one."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_for(lambda: (s := job_field(job, "JobState")) in final and s, timeout, f"job {job} to end")


def log_text(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm-*.log")))
