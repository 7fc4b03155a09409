"""Sweeps (-m): every point in its own run directory, a failed point does not stop the others, and the
summary table (overrides, final losses, tokens/s, status) from the points' files."""

import json

import pytest

from launcher.cli import main
from launcher.sweep import format_table, sweep_rows
from tests.launcher.run_files import launch, step_record, write_run


def write_sweep_dir(sweep_dir, points):
    entries = [{"index": i, "swept": swept, "run_dir": str(sweep_dir / str(i)), "job_id": None} for i, swept in points]
    (sweep_dir / "sweep.json").write_text(json.dumps({"launcher": "local", "points": entries, "summary_job_id": None}))


def test_rows_come_from_each_points_metrics_and_launch_log(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    write_run(
        sweep_dir / "0",
        [step_record(1, 4.0, 1000.0), step_record(2, 3.0, 3000.0, val=3.25), step_record(3, 2.0, 2000.0)],
        [launch("start"), launch("exit", 0)],
    )
    failed = write_run(sweep_dir / "1", [step_record(1, 9.0, 500.0)], [launch("start"), launch("exit", 1)])
    (failed / "console.log").write_text("moe-launch: non-finite loss or gradient at step 2; stopping without saving\n")
    write_sweep_dir(sweep_dir, [(0, ["optim.lr=0.001"]), (1, ["optim.lr=1e+30"]), (2, ["optim.lr=3"])])
    rows = sweep_rows(sweep_dir)
    assert [(r["status"], r["last_step"], r["final_loss"], r["final_val_loss"], r["tokens_per_s"]) for r in rows] == [
        ("completed", 3, 2.0, 3.25, 2000.0),
        ("failed", 1, 9.0, None, 500.0),
        ("not started", None, None, None, None),
    ]
    assert rows[1]["detail"] == "exit code 1: non-finite loss or gradient at step 2; stopping without saving"
    table = format_table(rows).splitlines()
    header = ["point", "overrides", "status", "steps", "train loss", "val loss", "tokens/s", "run dir"]
    assert [c.strip() for c in table[0].split("|")[1:-1]] == header
    assert len({len(line) for line in table}) == 1  # columns line up
    assert [c.strip() for c in table[2].split("|")[1:-1]] == [
        "0", "optim.lr=0.001", "completed", "3", "2.0000", "3.2500", "2,000", str(sweep_dir / "0")
    ]  # fmt: skip
    assert [c.strip() for c in table[4].split("|")[1:-1]][2:4] == ["not started", "-"]
    assert main(["sweep-status", str(sweep_dir), "--write"]) == 0
    assert capsys.readouterr().out == format_table(rows) == (sweep_dir / "summary.md").read_text()
    assert json.loads((sweep_dir / "summary.json").read_text()) == rows
    assert main(["status", str(sweep_dir)]) == 0  # status of a sweep directory: the same table
    assert capsys.readouterr().out == f"sweep: {sweep_dir}\n" + format_table(rows)


def test_sweep_status_of_a_plain_directory_exits_2(tmp_path, capsys):
    assert main(["sweep-status", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"moe-launch: error: {tmp_path}: not a sweep directory (no sweep.json)\n"


@pytest.mark.slow
def test_local_sweep_runs_every_point_and_a_failed_one_does_not_stop_the_others(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    code = main(
        [
            "train",
            "config=tiny",
            "data=synthetic",
            "logging.wandb.mode=disabled",
            "launcher.nproc_per_node=1",
            "launcher.parallel_runs=2",
            "train.steps=2",
            "train.log_every=1",
            "train.eval_batches=1",
            "optim.lr=1e30,1e-3",  # the first point's loss turns non-finite: it fails, the second still runs
            f"run_dir={sweep_dir}",
            "-m",
        ]
    )
    assert code == 1  # not every point completed
    out = capsys.readouterr().out
    assert f"moe-launch: sweep of 2 points in {sweep_dir}\n" in out
    assert f"point 2/2 [optim.lr=0.001] started in {sweep_dir / '1'}" in out
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert [(r["overrides"], r["status"], r["run_dir"]) for r in rows] == [
        ("optim.lr=1e+30", "failed", str(sweep_dir / "0")),
        ("optim.lr=0.001", "completed", str(sweep_dir / "1")),
    ]
    assert "non-finite loss or gradient" in rows[0]["detail"]
    assert rows[1]["last_step"] == 2 and rows[1]["final_loss"] > 0 and rows[1]["tokens_per_s"] > 0
    assert (sweep_dir / "1" / "checkpoints" / "step-00000002").is_dir()
    assert out.endswith((sweep_dir / "summary.md").read_text())
