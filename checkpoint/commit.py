"""The on-disk contract of a committed checkpoint, in plain Python (no torch import).

RUN_DIR/checkpoints/step-XXXXXXXX is complete when its `COMMITTED` marker exists and every
file it lists has the size it records; it is verified when every file's content checksum
matches too. The launcher reads this (did a stop save?), so it stays importable without torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from checkpoint.checksum import ALGORITHM, checksum_file

CHECKPOINTS_DIR = "checkpoints"
COMMIT_MARKER = "COMMITTED"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "config.yaml"  # RUN_DIR/config.yaml, the resolved config a launch wrote; each checkpoint keeps a copy
STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMMIT_MARKER}


def marker_text(files: dict[str, tuple[int, str]]) -> str:
    """COMMITTED's content: {name: (size, checksum)} of every file of the checkpoint."""
    return json.dumps(
        {
            "files": {name: size for name, (size, _) in sorted(files.items())},
            "checksum": ALGORITHM,
            "checksums": {name: digest for name, (_, digest) in sorted(files.items())},
        },
        indent=1,
    )


def read_marker(path: Path) -> dict | str:
    """The parsed COMMITTED marker, or why there is none (one phrase)."""
    marker = path / COMMIT_MARKER
    if not marker.is_file():
        return "no COMMITTED marker"
    try:
        record = json.loads(marker.read_text())
        if not isinstance(record.get("files"), dict):
            raise ValueError
    except (ValueError, OSError, AttributeError):
        return "unreadable COMMITTED marker"
    return record


def check_complete(path: Path) -> str | None:
    """None if the checkpoint is whole (marker, every file at its recorded size), else why not.
    Cheap: reads no file's content."""
    record = read_marker(path)
    if isinstance(record, str):
        return record
    actual = file_sizes(path)
    for name, size in record["files"].items():
        if name not in actual:
            return f"missing {name}"
        if actual[name] != size:
            return f"{name} is {actual[name]} bytes, expected {size} (truncated?)"
    return None


def checksummed_files(path: Path) -> list[str]:
    """The files whose checksums COMMITTED records (none for a checkpoint older than checksums)."""
    record = read_marker(path)
    return sorted(record.get("checksums", {})) if isinstance(record, dict) else []


def verify_files(path: Path, names: list[str]) -> str | None:
    """Re-hash the named files of a checkpoint; None if each matches COMMITTED, else which does not."""
    record = read_marker(path)
    if isinstance(record, str):
        return record
    algorithm, expected = record.get("checksum", ALGORITHM), record.get("checksums", {})
    for name in names:
        try:
            got = checksum_file(path / name, algorithm)
        except (OSError, ValueError) as err:
            return f"{name}: cannot checksum ({err})"
        if got != expected[name]:
            return f"{name} is corrupt: its {algorithm} checksum is {got}, COMMITTED records {expected[name]}"
    return None


def check_checkpoint(path: Path, verify: bool = True) -> str | None:
    """None if the checkpoint is whole and (verify=True) every file's content matches its checksum."""
    if not path.is_dir():
        return "no such directory"
    problem = check_complete(path)
    if problem is None and verify:
        problem = verify_files(path, checksummed_files(path))
    return problem


def step_dirs(root: Path) -> list[Path]:
    """Directories named like a committed checkpoint under root, oldest first (numeric; not checked)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=step_of)


def newest_complete_step(run_dir: str | Path, verify: bool = False) -> int | None:
    """The step of the newest whole (verify=True: and verified) checkpoint of a run, None if none."""
    for path in reversed(step_dirs(Path(run_dir) / CHECKPOINTS_DIR)):
        if check_checkpoint(path, verify) is None:
            return step_of(path)
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
