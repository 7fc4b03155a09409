"""`moe-launch report`: a run's numbers from metrics.jsonl and its launch log, and the PNG of them."""

from pathlib import Path

from launcher.cli import main
from tests.launcher.run_files import launch, step_record, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def requeued_run(run_dir: Path) -> Path:
    records = [
        {"step": 0, "val_loss": 5.0},
        step_record(1, 4.0, 1000.0),
        step_record(2, 3.0, 3000.0, val=3.5),
        {"step": 2, "event": "resume", "checkpoint": str(run_dir / "checkpoints" / "step-00000002")},
        {"step": 2, "val_loss": 3.5},
        step_record(3, 2.5, 2000.0),
        step_record(4, 2.0, 2500.0, val=3.6),
    ]
    launches = [launch("start", job=9), launch("exit", 75, job=9), launch("start", 0, 1, 9), launch("exit", 0, 1, 9)]
    return write_run(run_dir, records, launches)


def test_report_prints_losses_throughput_restarts_and_resumes(tmp_path, capsys):
    run_dir = requeued_run(tmp_path / "run")
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"run:        {run_dir}",
        "experiment: tiny (local launcher)",
        "steps:      4/4",
        "tokens:     2,048",
        "train loss: final 2.0000",
        "val loss:   final 3.6000, best 3.5000 at step 2",
        "tokens/s:   2,250 (median over logged windows)",
        "launches:   2 (1 SLURM restarts)",
        "  SLURM job 9 restart 0 on 1 node(s): stopped by a signal after saving a checkpoint (requeue to resume)",
        "  SLURM job 9 restart 1 on 1 node(s): completed",
        "resumes:    1",
        "  at step 2 from step-00000002",
    ]


def test_png_of_a_run_and_of_a_sweep(tmp_path, capsys):
    run_dir = requeued_run(tmp_path / "run")
    png = tmp_path / "run.png"
    assert main(["report", str(run_dir), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    sweep_dir = tmp_path / "sweep"
    requeued_run(sweep_dir / "0")
    write_run(sweep_dir / "1", [step_record(1, 4.5, 900.0, val=4.4)], [launch("start"), launch("exit", 1)])
    (sweep_dir / "sweep.json").write_text(
        '{"launcher": "local", "summary_job_id": null, "points": ['
        f'{{"index": 0, "swept": ["optim.lr=0.001"], "run_dir": "{sweep_dir / "0"}", "job_id": null}}, '
        f'{{"index": 1, "swept": ["optim.lr=0.003"], "run_dir": "{sweep_dir / "1"}", "job_id": null}}]}}'
    )
    capsys.readouterr()
    png = tmp_path / "sweep.png"
    assert main(["report", str(sweep_dir), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sweep: {sweep_dir}\n| point | overrides ")
    assert "| optim.lr=0.003 | failed: exit code 1 |" in out
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_report_of_something_that_is_not_a_run_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"moe-launch: error: {tmp_path / 'nope'}: no such run directory\n"
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run or sweep directory" in capsys.readouterr().err
    run_dir = requeued_run(tmp_path / "run")
    assert main(["report", str(run_dir), "--png", "plot.jpg"]) == 2
    assert capsys.readouterr().err == "moe-launch: error: --png plot.jpg: must end in .png\n"
