"""launcher=slurm against a real SLURM (scripts/local_slurm.sh: two emulated nodes on 127.0.0.1):
a 2-node job trains and checkpoints, a signalled job saves, requeues itself and resumes, status and cancel."""

import json
import subprocess

import pytest

from launcher.cli import main
from launcher.launch_log import read as read_launches
from launcher.run_metrics import read_records
from tests.launcher.slurm_cluster import TINY, job_field, job_id, log_text, slurm_cluster, wait_for, wait_for_end

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]
__all__ = ["slurm_cluster"]

NASTY_NAME = "moe a'b\"c; touch pwned"


def hydra_quote(value: str) -> str:
    """A Hydra override value in single quotes (a quote inside is escaped)."""
    return "'" + value.replace("'", "\\'") + "'"


def test_two_node_job_with_a_nasty_name_trains_and_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "run dir; 'q'"
    code = main(
        [
            *TINY,
            "launcher.nnodes=2",
            "train.steps=4",
            "train.log_every=2",
            "checkpoint.interval=2",
            f"launcher.job_name={hydra_quote(NASTY_NAME)}",
            f"run_dir={hydra_quote(str(run_dir))}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    job = job_id(run_dir)
    assert f"submitted SLURM job {job}; log {run_dir}/slurm-{job}.log" in out
    name = subprocess.run(["squeue", "-h", "-j", job, "-o", "%j"], capture_output=True, text=True).stdout
    assert name.rstrip("\n") == NASTY_NAME  # the quoted value arrived whole
    assert wait_for_end(job) == "COMPLETED", log_text(run_dir)
    log = log_text(run_dir)
    assert "world 2 (pp 1 x dp_replicate 1 x dp_shard 2" in log  # one rank on each emulated node
    assert not list(tmp_path.glob("pwned")) and not (run_dir / "pwned").exists()
    steps = [r["step"] for r in read_records(run_dir) if "loss" in r]
    assert steps == [2, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert [(e["event"], e["code"], e["nodes"]) for e in read_launches(run_dir)] == [("start", 0, 2), ("exit", 0, 2)]
    assert main(["status", str(run_dir)]) == 0
    status = capsys.readouterr().out
    assert "state:      completed" in status and "last step:  4/4" in status and "checkpoint: step 4" in status


def test_signalled_job_saves_requeues_itself_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "requeue"
    steps = 100  # far more than reach step 3 plus the signal's delivery, even on a fast idle machine
    args = [*TINY, f"train.steps={steps}", "train.log_every=1", "checkpoint.interval=5", f"run_dir={run_dir}"]
    assert main(args) == 0
    job = job_id(run_dir)

    def logged_step() -> int:
        return max((r["step"] for r in read_records(run_dir) if "loss" in r), default=0)

    wait_for(lambda: logged_step() >= 3, 240, "step 3")
    before = logged_step()
    # What SLURM does ahead of the time limit (--signal=B:USR1@N), without waiting for it.
    subprocess.run(["scancel", "-s", "USR1", "-b", job], check=True)
    assert wait_for_end(job, timeout=300) == "COMPLETED", log_text(run_dir)
    log = log_text(run_dir)
    assert "moe-launch: got SIGUSR1; the ranks save a checkpoint" in log
    assert f"moe-launch: checkpoint saved; requeueing job {job}" in log
    assert job_field(job, "Restarts") == "1"
    launches = [(e["event"], e["restart_count"], e["code"]) for e in read_launches(run_dir)]
    assert launches == [("start", 0, 0), ("exit", 0, 75), ("start", 1, 0), ("exit", 1, 0)]
    records = read_records(run_dir)
    (resume,) = [r for r in records if r.get("event") == "resume"]
    # The stop save is at the step after the signal: nothing trained before it is lost.
    assert resume["step"] >= before and resume["checkpoint"].endswith(f"step-{resume['step']:08d}")
    assert f"resumed from {run_dir}/checkpoints/step-{resume['step']:08d}" in log
    assert max(r["step"] for r in records) == steps
    assert main(["status", str(run_dir)]) == 0
    assert "restarts:   1" in capsys.readouterr().out
    assert main(["report", str(run_dir), "--png", str(tmp_path / "report.png")]) == 0
    report = capsys.readouterr().out
    assert f"SLURM job {job} restart 0 on 1 node(s): stopped by a signal after saving a checkpoint" in report
    assert f"SLURM job {job} restart 1 on 1 node(s): completed" in report
    assert f"at step {resume['step']} from step-{resume['step']:08d}" in report
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_and_cancel_a_pending_job(tmp_path, capsys):
    run_dir = tmp_path / "pending"
    args = [*TINY, "train.steps=2", f"run_dir={run_dir}", "launcher.extra_directives=['--begin=now+1hour']"]
    assert main(args) == 0
    job = job_id(run_dir)
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"launcher:   SLURM job {job}" in out and "state:      pending (BeginTime)" in out
    assert main(["cancel", str(run_dir)]) == 0
    assert f"cancelled SLURM job {job}" in capsys.readouterr().out
    wait_for(lambda: job_field(job, "JobState") == "CANCELLED", 30, "the cancel")
    assert main(["status", str(run_dir)]) == 0
    assert "state:      cancelled" in capsys.readouterr().out


def test_two_point_sweep_on_slurm_writes_the_summary(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    args = [*TINY, "train.steps=2", "train.log_every=1", "optim.lr=1e-3,3e-3", f"run_dir={sweep_dir}", "-m"]
    assert main(args) == 0
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["swept"] for p in sweep["points"]] == [["optim.lr=0.001"], ["optim.lr=0.003"]]
    assert [p["run_dir"] for p in sweep["points"]] == [str(sweep_dir / "0"), str(sweep_dir / "1")]
    summary_job = sweep["summary_job_id"]
    assert job_field(summary_job, "Dependency").startswith("afterany:")
    assert wait_for_end(summary_job) == "COMPLETED"
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [(r["overrides"], r["status"], r["last_step"]) for r in rows] == [
        ("optim.lr=0.001", "completed", 2),
        ("optim.lr=0.003", "completed", 2),
    ]
    assert all(r["final_loss"] > 0 and r["final_val_loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    table = (sweep_dir / "summary.md").read_text()
    assert "| optim.lr=0.001 | completed" in table
    capsys.readouterr()
    assert main(["sweep-status", str(sweep_dir)]) == 0
    assert capsys.readouterr().out == table
