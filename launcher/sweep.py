"""Sweeps (-m): one run directory per point of Hydra's cross product, run here or as SLURM jobs,
and the sweep directory's summary table (overrides, final losses, tokens/s, status per point).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from launcher import launch_log, slurm
from launcher.local import LocalLauncher
from launcher.run_dir import resolved_config_path, write_resolved_config
from launcher.run_metrics import fmt, read_records, summarize
from launcher.status import run_status

SWEEP_FILE = "sweep.json"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
POINT_LOG = "console.log"  # a local point's stdout and stderr
POLL_S = 0.5


@dataclass
class SweepPoint:
    index: int
    swept: list[str]  # the overrides that vary across the sweep, key=value
    run_dir: str
    job_id: str | None = None


def swept_overrides(point: list[str], swept_keys: list[str]) -> list[str]:
    return [ov for ov in point if ov.split("=", 1)[0].lstrip("+~") in swept_keys]


def read_sweep(sweep_dir: str | Path) -> dict | None:
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_sweep(sweep_dir: Path, launcher: str, points: list[SweepPoint], summary_job: str | None = None) -> None:
    record = {"launcher": launcher, "points": [asdict(p) for p in points], "summary_job_id": summary_job}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / (SWEEP_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, sweep_dir / SWEEP_FILE)


# ---- running the points -------------------------------------------------------------------------


def run_local_point(run_dir: str) -> int:
    """One local point, in its own process (signal handlers need a main thread): torchrun on the
    config the sweep already validated and wrote, with the launch log around it."""
    from framework.config import load_run_config

    cfg = load_run_config(Path(run_dir) / "config.yaml")
    launcher = LocalLauncher()
    launch_log.record(run_dir, "start")
    code = launcher.launch(cfg, launcher.command(cfg, resolved_config_path(cfg)))
    launch_log.record(run_dir, "exit", code)
    return code


def _point_line(point: SweepPoint, total: int) -> str:
    return f"point {point.index + 1}/{total} [{' '.join(point.swept) or 'no swept keys'}]"


def run_local(sweep_dir: Path, points: list[SweepPoint], cfgs: list[DictConfig], parallel_runs: int) -> int:
    """Run the points parallel_runs at a time; a failed point does not stop the others. SIGTERM/SIGINT
    pass a stop on to the running points (they save) and start no more. Returns 0 if all completed."""
    write_sweep(sweep_dir, "local", points)
    for cfg in cfgs:
        write_resolved_config(cfg)
    pending, running, failed = list(points), {}, 0
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running or (pending and not stopping):
            while pending and not stopping and len(running) < parallel_runs:
                point = pending.pop(0)
                log = (Path(point.run_dir) / POINT_LOG).open("ab")
                command = [sys.executable, "-m", "launcher.sweep", "--run-point", point.run_dir]
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                running[point.index] = (proc, point, log)
                print(f"moe-launch: {_point_line(point, len(points))} started in {point.run_dir}", flush=True)
            time.sleep(POLL_S)
            for index, (proc, point, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[index]
                row = point_row(point)
                failed += row["status"] != "completed"
                how = row["status"] + (f": {row['detail']}" if row["detail"] else "")
                print(
                    f"moe-launch: {_point_line(point, len(points))} {how}; "
                    f"loss {fmt(row['final_loss'])}, val {fmt(row['final_val_loss'])}",
                    flush=True,
                )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(write_summary(sweep_dir), end="")
    return 0 if not failed and not pending and not stopping else 1


def submit_slurm(sweep_dir: Path, points: list[SweepPoint], cfgs: list[DictConfig]) -> int:
    """Each point is its own job; one more job, after all of them end, writes the summary."""
    for point, cfg in zip(points, cfgs, strict=True):
        point.job_id = slurm.submit(cfg, write_resolved_config(cfg))
        write_sweep(sweep_dir, "slurm", points)  # after each: `moe-launch cancel` finds what was submitted
        print(f"moe-launch: {_point_line(point, len(points))} submitted as SLURM job {point.job_id}", flush=True)
    summary = [sys.executable, "-m", "launcher.cli", "sweep-status", str(sweep_dir), "--write"]
    command = [
        "sbatch",
        "--parsable",
        f"--dependency=afterany:{':'.join(p.job_id for p in points)}",
        f"--job-name={cfgs[0].launcher.job_name or cfgs[0].experiment}-summary",
        "--nodes=1",
        "--ntasks=1",
        f"--chdir={os.getcwd()}",
        f"--output={sweep_dir / 'summary-%j.log'}",
        f"--wrap={shlex.join(summary)}",  # sbatch puts this line into a /bin/sh script: quoted
    ]
    summary_job = slurm.run_client(command, "a SLURM sweep").strip().split(";")[0]
    write_sweep(sweep_dir, "slurm", points, summary_job)
    print(f"moe-launch: the summary job {summary_job} writes {sweep_dir / SUMMARY_MD} when all points end")
    print(f"moe-launch: watch it with `moe-launch sweep-status {sweep_dir}`", flush=True)
    return 0


# ---- the summary ---------------------------------------------------------------------------------


def point_row(point: SweepPoint) -> dict:
    status = run_status(point.run_dir)
    numbers = summarize(read_records(point.run_dir))
    return {
        "point": point.index,
        "overrides": " ".join(point.swept),
        "status": status.state,
        "detail": status.detail,
        "last_step": numbers.last_step,
        "final_loss": numbers.final_loss,
        "final_val_loss": numbers.final_val_loss,
        "tokens_per_s": numbers.tokens_per_s,
        "run_dir": point.run_dir,
    }


def sweep_rows(sweep_dir: str | Path) -> list[dict]:
    sweep = read_sweep(sweep_dir)
    if sweep is None:
        raise FileNotFoundError(f"{sweep_dir}: not a sweep directory (no {SWEEP_FILE})")
    return [point_row(SweepPoint(**p)) for p in sweep["points"]]


def format_table(rows: list[dict]) -> str:
    """A Markdown table, readable as plain text too."""
    header = ["point", "overrides", "status", "steps", "train loss", "val loss", "tokens/s", "run dir"]
    body = [
        [
            str(r["point"]),
            r["overrides"] or "-",
            r["status"] + (f": {r['detail']}" if r["detail"] and r["status"] != "completed" else ""),
            fmt(r["last_step"], "d"),
            fmt(r["final_loss"]),
            fmt(r["final_val_loss"]),
            fmt(r["tokens_per_s"], ",.0f"),
            r["run_dir"],
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in [header, *body]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path) -> str:
    """summary.md (the table) and summary.json (the rows) in the sweep directory; returns the table."""
    rows = sweep_rows(sweep_dir)
    table = format_table(rows)
    Path(sweep_dir, SUMMARY_MD).write_text(table)
    Path(sweep_dir, SUMMARY_JSON).write_text(json.dumps(rows, indent=1) + "\n")
    return table


if __name__ == "__main__":
    if sys.argv[1:2] != ["--run-point"] or len(sys.argv) != 3:
        sys.exit("usage: python -m launcher.sweep --run-point RUN_DIR  (started by `moe-launch train -m`)")
    sys.exit(run_local_point(sys.argv[2]))
