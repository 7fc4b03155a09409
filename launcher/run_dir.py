"""The run directory: where the resolved config, metrics and logs of one run live.

Relative paths resolve against the project; a default run dir is claimed exclusively; every
launch keeps its resolved config (config.yaml, the newest, plus config.segment-N.yaml).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from checkpoint.commit import CHECKPOINTS_DIR
from framework.config import RESOLVED_CONFIG_NAME
from framework.metrics import METRICS_FILE
from launcher.errors import ConfigError
from launcher.launch_log import JOB_FILE, LAUNCH_LOG

PROJECT_DIR = Path(__file__).resolve().parent.parent  # relative run_dir, data.path and resume start here
SEGMENT_CONFIG = re.compile(r"^config\.segment-(\d+)\.yaml$")
MAX_RUN_DIR_SUFFIX = 1000


def project_path(value: str) -> Path:
    """A path from the config: ~ expanded, relative ones against the project (not the cwd)."""
    path = Path(value).expanduser()
    return (path if path.is_absolute() else PROJECT_DIR / path).resolve()


def finalize_paths(cfg: DictConfig) -> bool:
    """Make every path absolute, so ranks read the same files whatever their cwd.
    -> True when the run dir is a default one (runs/EXPERIMENT/TIMESTAMP), still to be claimed."""
    fresh = not cfg.run_dir
    if fresh:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.run_dir = str(Path("runs") / cfg.experiment / stamp)
    cfg.run_dir = str(project_path(cfg.run_dir))
    cfg.data.path = str(project_path(cfg.data.path))
    if cfg.resume not in ("auto", "never", "overwrite"):
        cfg.resume = str(project_path(cfg.resume))
    return fresh


def _cannot_create(path: Path, err: OSError) -> ConfigError:
    reason = err.strerror or str(err)
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        in_the_way = next((p for p in (path, *path.parents) if p.is_file()), path)
        reason = f"{in_the_way} is a file, not a directory"
    return ConfigError(f"run_dir={path}: cannot create it ({reason}); allowed: a writable directory path")


def check_run_dir(cfg: DictConfig) -> None:
    """Before anything reads the run dir: it is a directory, or a path that can be one."""
    path = Path(cfg.run_dir)
    try:
        if path.exists() and not path.is_dir():
            raise FileExistsError(errno.EEXIST, "exists", str(path))
    except OSError as err:  # a name too long, a parent that is a file, ...
        raise _cannot_create(path, err) from None


def claim_run_dir(cfg: DictConfig, fresh: bool) -> None:
    """Create the run dir. A default one is created exclusively (os.mkdir): two launches in
    the same second get TIMESTAMP and TIMESTAMP-2, never one shared directory."""
    path = Path(cfg.run_dir)
    try:
        if not fresh:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.touch()  # a read-only directory fails here, not in the ranks
            probe.unlink()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, MAX_RUN_DIR_SUFFIX):
            candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            cfg.run_dir = str(candidate)
            return
    except OSError as err:
        raise _cannot_create(path, err) from None
    raise ConfigError(f"run_dir={path}: {MAX_RUN_DIR_SUFFIX} runs started in this second; give run_dir=PATH")


def clear_previous_run(cfg: DictConfig) -> list[str]:
    """resume=overwrite: delete the previous run's checkpoints, metrics and segment configs,
    so nothing of it mixes with the new run. -> what was removed (names)."""
    run_dir = Path(cfg.run_dir)
    removed = []
    for name in (CHECKPOINTS_DIR, METRICS_FILE, LAUNCH_LOG, JOB_FILE):
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
            removed.append(name)
        elif target.exists():
            target.unlink()
            removed.append(name)
    for segment in sorted(run_dir.glob("config.segment-*.yaml")):
        segment.unlink()
        removed.append(segment.name)
    return removed


def resolved_config_path(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) / RESOLVED_CONFIG_NAME


def write_resolved_config(cfg: DictConfig) -> Path:
    """Write config.yaml atomically (temp name + rename): a reader never sees half a file.
    A copy stays as config.segment-N.yaml (N = 1, 2, ... one per launch), created exclusively."""
    path = resolved_config_path(cfg)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        used = [int(m.group(1)) for p in path.parent.iterdir() if (m := SEGMENT_CONFIG.match(p.name))]
        segment = max(used, default=0) + 1
        while True:
            try:
                with open(path.parent / f"config.segment-{segment}.yaml", "x") as f:
                    f.write(text)
                break
            except FileExistsError:  # another launch took this number just now
                segment += 1
        tmp = path.with_suffix(f".yaml.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        raise _cannot_create(path.parent, err) from None
    return path
