"""Run directories written by hand, shaped like the ones a launch leaves: config, metrics, launch log."""

from __future__ import annotations

import json
from pathlib import Path


def write_run(run_dir: Path, records: list[dict], launches: list[dict] = (), steps: int = 4) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"experiment: tiny\nlauncher:\n  name: local\ntrain:\n  steps: {steps}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "launches.jsonl").write_text("".join(json.dumps(e) + "\n" for e in launches))
    return run_dir


def step_record(step: int, loss: float, tokens_per_s: float, val: float | None = None) -> dict:
    record = {
        "step": step,
        "loss": loss,
        "lr": 1e-3 * step,
        "tokens_per_s": tokens_per_s,
        "tokens_seen": 512 * step,
        "load_imbalance": [1.0 + 0.1 * step, 1.5],
        "expert_tokens": [[10 * step, 5, 5, 4], [3, 3, 3, 9]],
    }
    if val is not None:
        record["val_loss"] = val
    return record


def launch(event: str, code: int = 0, restart: int = 0, job: int = 0) -> dict:
    return {"event": event, "job_id": job, "restart_count": restart, "nodes": 1, "code": code, "time": 0, "pid": 0}
