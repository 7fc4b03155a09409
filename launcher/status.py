"""What a run is doing now: its SLURM job's state (or its local launch log), restarts, the last step.

`moe-launch status` prints it; sweep summaries use the one-word state and the reason for a failure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from checkpoint.commit import newest_complete_step
from launcher import launch_log, slurm
from launcher.run_metrics import read_records

ERROR_PREFIX = "moe-launch: error: "
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD")


@dataclass
class RunStatus:
    state: str  # completed | running | pending | requeued | failed | stopped | cancelled | not started | ...
    detail: str  # why, in words (a failure's error line, SLURM's reason)
    job_id: str | None
    restarts: int
    last_step: int | None
    total_steps: int | None
    newest_checkpoint: int | None

    @property
    def active(self) -> bool:
        return self.state in ("running", "pending", "requeued")


LAUNCHER_LINES = ("moe-launch: job ", "moe-launch: got SIG", "moe-launch: checkpoint saved", "moe-launch: run dir")
WRAPPER_ERRORS = ("ChildFailedError", "SignalException")  # torchrun's summary of a rank's failure, not the cause


def _reason(lines: list[str]) -> str:
    """Why a run failed, from its console: an error line, else the trainer's stop message, else an exception."""
    for line in reversed(lines):
        if ERROR_PREFIX in line:
            return line.split(ERROR_PREFIX, 1)[1].strip()
    for line in reversed(lines):  # the trainer's stop message (not a status line with " | ")
        if line.startswith("moe-launch: ") and " | " not in line and not line.startswith(LAUNCHER_LINES):
            return line.removeprefix("moe-launch: ").strip()
    for line in reversed(lines):
        head = line.split(":")[0]
        if head.endswith(("Error", "Exception")) and not head.endswith(WRAPPER_ERRORS) and " " not in head:
            return line.strip()
    return ""


def _last_error(run_dir: Path, job: dict | None) -> str:
    """The reason a run failed, from its newest log (a SLURM job's, or a local sweep point's console)."""
    logs = [Path(job["log"])] if job else []
    logs += sorted(run_dir.glob("slurm-*.log")) + [run_dir / "console.log"]
    for log in logs:
        if log.is_file():
            reason = _reason(log.read_text(errors="replace").splitlines())
            if reason:
                return reason
    return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _from_launch_log(events: list[dict]) -> tuple[str, str]:
    if not events:
        return "not started", ""
    last = events[-1]
    if last["event"] == "start":
        if last.get("pid") and not _pid_alive(last["pid"]):
            return "failed", "the launcher died without recording an exit"
        return "running", ""
    code = last["code"]
    if code == 0:
        return "completed", ""
    if code == launch_log.REQUEUE_EXIT_CODE:
        return "stopped", launch_log.describe_exit(code)
    return "failed", f"killed by signal {code - 128}" if code > 128 else f"exit code {code}"


def _from_slurm(state: dict[str, str]) -> tuple[str, str]:
    words = state["state"].lower()
    reason = "" if state["reason"] in ("None", "") else state["reason"]
    if words in ("running", "completing", "configuring"):
        return "running", state["nodes"]
    if words in ("pending", "requeued", "requeue_hold", "suspended"):
        return ("requeued" if words.startswith("requeue") else "pending"), reason
    if words == "completed":
        return "completed", ""
    exit_code = state["exit_code"].split(":")[0]
    return words, f"exit code {exit_code}" if exit_code not in ("", "0") else reason


def run_status(run_dir: str | Path) -> RunStatus:
    run_dir = Path(run_dir)
    job = slurm.read_job(run_dir)
    events = launch_log.read(run_dir)
    restarts = max((e.get("restart_count", 0) for e in events), default=0)
    state, detail = _from_launch_log(events)
    if job is not None:
        queried = slurm.job_state(job["job_id"])
        if queried is not None:
            state, detail = _from_slurm(queried)
            if queried["restarts"].isdigit():
                restarts = int(queried["restarts"])
        elif not events:
            state, detail = "unknown", f"SLURM no longer knows job {job['job_id']} and it never started"
    if state not in ("completed", "running", "pending", "requeued", "not started"):
        error = _last_error(run_dir, job)
        detail = f"{detail}: {error}" if error and detail else error or detail
    records = read_records(run_dir)
    total = None
    config = run_dir / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        total = OmegaConf.load(config).train.steps
    return RunStatus(
        state=state,
        detail=detail,
        job_id=job["job_id"] if job else None,
        restarts=restarts,
        last_step=max((r["step"] for r in records), default=None),
        total_steps=total,
        newest_checkpoint=newest_complete_step(run_dir),
    )


def format_status(run_dir: str | Path, status: RunStatus) -> str:
    where = f"SLURM job {status.job_id}" if status.job_id else "local"
    step = "-" if status.last_step is None else str(status.last_step)
    if status.total_steps:
        step += f"/{status.total_steps}"
    ckpt = "none" if status.newest_checkpoint is None else f"step {status.newest_checkpoint}"
    lines = [
        f"run:        {run_dir}",
        f"launcher:   {where}",
        f"state:      {status.state}" + (f" ({status.detail})" if status.detail else ""),
        f"restarts:   {status.restarts}",
        f"last step:  {step}",
        f"checkpoint: {ckpt}",
    ]
    return "\n".join(lines)
