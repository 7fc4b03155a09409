"""Reading a finished or running run from its files: metrics.jsonl in numbers (losses, throughput, resumes).

Used by status, sweep summaries and reports; plain Python, so it never waits on torch.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from framework.metrics import METRICS_FILE  # written on rank 0; the module imports no torch
from launcher.jsonl import read_jsonl


def read_records(run_dir: str | Path) -> list[dict]:
    """Every record so far, in order; a line cut short by a crash is skipped."""
    return [r for r in read_jsonl(Path(run_dir) / METRICS_FILE) if isinstance(r, dict) and "step" in r]


@dataclass
class RunNumbers:
    """What a run's metrics say, in the units a user reads."""

    last_step: int | None = None
    tokens_seen: int | None = None
    final_loss: float | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    tokens_per_s: float | None = None  # median over logged windows
    resumes: list[tuple[int, str]] = field(default_factory=list)  # (step, checkpoint) per resume


def summarize(records: list[dict]) -> RunNumbers:
    numbers = RunNumbers()
    if not records:
        return numbers
    numbers.last_step = max(r["step"] for r in records)
    losses = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    if losses:
        numbers.final_loss = losses[-1]["loss"]
        numbers.tokens_seen = losses[-1].get("tokens_seen")
        numbers.tokens_per_s = statistics.median(r["tokens_per_s"] for r in losses if "tokens_per_s" in r)
    if vals:
        numbers.final_val_loss = vals[-1]["val_loss"]
        best = min(vals, key=lambda r: r["val_loss"])
        numbers.best_val_loss, numbers.best_val_step = best["val_loss"], best["step"]
    numbers.resumes = [(r["step"], r["checkpoint"]) for r in records if r.get("event") == "resume"]
    return numbers


def fmt(value: float | int | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)
