"""The `moe-launch` commands that start a sweep or look after runs: status, cancel, sweep-status, report.

cli.py parses `train` and `export`; it hands these subcommands (and `train -m`) to this module.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from launcher import slurm
from launcher import sweep as sweeps
from launcher.compose import compose_config, expand_sweep
from launcher.errors import ConfigError
from launcher.local import LocalLauncher
from launcher.run_dir import finalize_paths, resolved_config_path
from launcher.slurm import SlurmLauncher
from launcher.status import format_status, run_status
from launcher.validation import validate

COMMANDS = ("status", "cancel", "sweep-status", "report")
RUNS_ROOT = Path("runs")


def launcher_for(cfg: DictConfig) -> LocalLauncher | SlurmLauncher:
    """The backend launcher.name picks; both build a command, preview it and launch it."""
    return SlurmLauncher() if cfg.launcher.name == "slurm" else LocalLauncher()


def add_parsers(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser(
        "status",
        help="a run's state, restarts and last step",
        description="A run's state (its SLURM job's, or the local launch's), restarts, last logged step and "
        "newest checkpoint; for a sweep directory, the table of its points. Default: the newest run under runs/.",
    )
    status.add_argument("run_dir", nargs="?", metavar="RUN_DIR")
    cancel = sub.add_parser("cancel", help="cancel a run's SLURM job, or every job of a sweep")
    cancel.add_argument("run_dir", metavar="RUN_DIR")
    sweep_status = sub.add_parser(
        "sweep-status",
        help="a sweep's summary table",
        description="The table of a sweep's points: overrides, status, steps, final train and validation loss, "
        "tokens/s. Works at any time, from the points' run directories.",
    )
    sweep_status.add_argument("sweep_dir", metavar="DIR")
    sweep_status.add_argument("--write", action="store_true", help="also write DIR/summary.md and summary.json")
    report = sub.add_parser(
        "report",
        help="a run's (or sweep's) summary; --png draws the curves",
        description="Steps, tokens, final and best losses, tokens/s, restarts and resumes from a run's "
        "metrics.jsonl; with --png, training/validation loss, learning rate and per-layer expert load over steps. "
        "For a sweep directory, the same for every point.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--png", metavar="FILE", default=None, help="write the plots to this PNG file")


def _existing(path: str, what: str) -> Path:
    run_dir = Path(path).expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"{path}: no such {what}")
    return run_dir


def _newest_run() -> Path:
    candidates = [p.parent for p in RUNS_ROOT.glob("*/*/config.yaml")] + [
        p.parent for p in RUNS_ROOT.glob("*/*/" + sweeps.SWEEP_FILE)
    ]
    if not candidates:
        raise ConfigError(f"no runs under {RUNS_ROOT.resolve()}; give RUN_DIR")
    return max(candidates, key=lambda p: p.stat().st_mtime).resolve()


def status(run_dir: str | None) -> int:
    path = _existing(run_dir, "run directory") if run_dir else _newest_run()
    if sweeps.read_sweep(path) is not None:
        print(f"sweep: {path}")
        print(sweeps.format_table(sweeps.sweep_rows(path)), end="")
        return 0
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path}: not a run directory (no config.yaml)")
    print(format_status(path, run_status(path)))
    return 0


def cancel(run_dir: str) -> int:
    path = _existing(run_dir, "run directory")
    sweep = sweeps.read_sweep(path)
    jobs = [p["job_id"] for p in sweep["points"] if p.get("job_id")] if sweep else []
    if sweep and sweep.get("summary_job_id"):
        jobs.append(sweep["summary_job_id"])
    job = slurm.read_job(path)
    if job:
        jobs.append(job["job_id"])
    if not jobs:
        raise ConfigError(f"{run_dir}: no SLURM job recorded here ({slurm.JOB_FILE}); a local run stops with Ctrl-C")
    for job_id in jobs:
        slurm.cancel(job_id)
        print(f"moe-launch: cancelled SLURM job {job_id}")
    return 0


def sweep_status(sweep_dir: str, write: bool) -> int:
    path = _existing(sweep_dir, "sweep directory")
    if sweeps.read_sweep(path) is None:
        raise ConfigError(f"{sweep_dir}: not a sweep directory (no {sweeps.SWEEP_FILE})")
    print(sweeps.write_summary(path) if write else sweeps.format_table(sweeps.sweep_rows(path)), end="")
    return 0


def report(run_dir: str, png: str | None) -> int:
    from launcher import report as reports

    path = _existing(run_dir, "run directory")
    if png is not None and not png.endswith(".png"):
        raise ConfigError(f"--png {png}: must end in .png")
    sweep = sweeps.read_sweep(path)
    if sweep is not None:
        text = reports.sweep_report(path, sweep, png)
    elif (path / "config.yaml").is_file():
        text = reports.run_report(path, png)
    else:
        raise ConfigError(f"{run_dir}: not a run or sweep directory (no config.yaml or {sweeps.SWEEP_FILE})")
    print(text)
    if png is not None:
        print(f"moe-launch: wrote {png}")
    return 0


def dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "status":
            return status(args.run_dir)
        if args.command == "cancel":
            return cancel(args.run_dir)
        if args.command == "sweep-status":
            return sweep_status(args.sweep_dir, args.write)
        return report(args.run_dir, args.png)
    except ConfigError as err:
        print(f"moe-launch: error: {err}", file=sys.stderr)
        return 2


def sweep(config: str, overrides: list[str], dry_run: bool) -> int:
    """Compose and validate every point before anything starts, then run them here or submit them."""
    points, swept_keys = expand_sweep(overrides)
    given_dir = [ov.split("=", 1)[1] for ov in overrides if ov.startswith("run_dir=")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweep_dir, cfgs, planned = None, [], []
    for index, point in enumerate(points):
        point = [ov for ov in point if not ov.startswith("run_dir=")]
        swept = sweeps.swept_overrides(point, swept_keys)
        try:
            cfg = compose_config(config, point)
            if sweep_dir is None:
                sweep_dir = Path(given_dir[-1] if given_dir else RUNS_ROOT / cfg.experiment / stamp)
                sweep_dir = sweep_dir.expanduser().resolve()
            cfg.run_dir = str(sweep_dir / str(index))
            finalize_paths(cfg)
            validate(cfg)
            if cfg.launcher.name != (cfgs[0] if cfgs else cfg).launcher.name:
                raise ConfigError(f"launcher={cfg.launcher.name}: every point of a sweep must use the same launcher")
        except ConfigError as err:
            raise ConfigError(f"sweep point {index + 1}/{len(points)} [{' '.join(swept)}]: {err}") from None
        cfgs.append(cfg)
        planned.append(sweeps.SweepPoint(index, swept, cfg.run_dir))
    if dry_run:
        for point, cfg in zip(planned, cfgs, strict=True):
            print(f"# point {point.index + 1}/{len(planned)} [{' '.join(point.swept)}] in {point.run_dir}")
            print(launcher_for(cfg).preview(cfg, resolved_config_path(cfg)))
        return 0
    print(f"moe-launch: sweep of {len(planned)} points in {sweep_dir}", flush=True)
    if cfgs[0].launcher.name == "slurm":
        return sweeps.submit_slurm(sweep_dir, planned, cfgs)
    return sweeps.run_local(sweep_dir, planned, cfgs, cfgs[0].launcher.parallel_runs)
