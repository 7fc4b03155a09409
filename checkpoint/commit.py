"""The on-disk contract of a committed checkpoint, in plain Python (no torch import).

RUN_DIR/checkpoints/step-XXXXXXXX is complete when its `COMMITTED` marker exists and every
file it lists has the size it records. The launcher reads this too (did a stop save?), so
it must stay importable without torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
COMMIT_MARKER = "COMMITTED"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "config.yaml"  # RUN_DIR/config.yaml, the resolved config a launch wrote; each checkpoint keeps a copy
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMMIT_MARKER}


def check_complete(path: Path) -> str | None:
    """None if the checkpoint is whole, else why not (one phrase)."""
    marker = path / COMMIT_MARKER
    if not marker.is_file():
        return "no COMMITTED marker"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable COMMITTED marker"
    actual = file_sizes(path)
    for name, size in expected.items():
        if name not in actual:
            return f"missing {name}"
        if actual[name] != size:
            return f"{name} is {actual[name]} bytes, expected {size} (truncated?)"
    return None


def step_dirs(root: Path) -> list[Path]:
    """Directories named like a committed checkpoint under root, oldest first (not checked)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def newest_complete_step(run_dir: str | Path) -> int | None:
    """The step of the newest whole checkpoint of a run, None if there is none."""
    for path in reversed(step_dirs(Path(run_dir) / CHECKPOINTS_DIR)):
        if check_complete(path) is None:
            return int(STEP_DIR.match(path.name).group(1))
    return None


def read_checkpoint_config(path: str | Path) -> str | None:
    """The resolved config (YAML text) the checkpoint at `path` was trained with; None for a
    checkpoint written before checkpoints kept it."""
    config = Path(path) / RUN_CONFIG
    return config.read_text() if config.is_file() else None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
