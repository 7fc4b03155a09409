"""Reading the run's append-only JSON-lines files (metrics.jsonl, launches.jsonl) while they
may still be written: a line cut short by a crash or a concurrent append is skipped."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: Path) -> list:
    """Every complete line's value, in order; [] when the file does not exist (yet)."""
    if not path.is_file():
        return []
    values = []
    for line in path.read_text().splitlines():
        try:
            values.append(json.loads(line))
        except ValueError:
            continue
    return values
