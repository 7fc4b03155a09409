"""Where metrics go: a live line on the console, RUN_DIR/metrics.jsonl, and wandb.

Only rank 0 writes; the train loop reduces values across ranks before logging them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, cfg, enabled: bool, wandb_run_id: str | None = None):
        self.enabled = enabled
        self.total_steps = cfg.train.steps
        self.path = Path(cfg.run_dir) / METRICS_FILE
        self.wandb_run = None
        if enabled and cfg.logging.wandb.mode != "disabled":
            self.wandb_run = _init_wandb(cfg, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        """Saved in checkpoints, so a resumed run continues the same wandb run."""
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, record: dict) -> None:
        """One JSON object per call appended to metrics.jsonl (and sent to wandb), stamped with
        `time` (Unix seconds) so records of several segments of one run line up."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        if self.wandb_run is not None:  # wandb keeps its own timestamp
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb_run.log(flat, step=record.get("step"))

    def console(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def progress(self, r: dict) -> None:
        """The live progress line: the numbers a user watches while a run trains."""
        if not self.enabled:
            return
        parts = [f"step {r['step']:>{len(str(self.total_steps))}}/{self.total_steps}", f"loss {r['loss']:.4f}"]
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4f}")
        parts += [
            f"lr {r['lr']:.2e}",
            f"gnorm {r['grad_norm']:.3f}",
            f"{r['tokens_per_s']:,.0f} tok/s",
            f"mfu {100 * r['mfu']:.2f}%",
            f"imbalance {r['max_load_imbalance']:.2f}",
        ]
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(cfg, run_id: str | None):
    """wandb in the run directory; offline mode needs no network and no API key."""
    import wandb
    from omegaconf import OmegaConf

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.logging.wandb.project,
        name=Path(cfg.run_dir).name,
        dir=cfg.run_dir,
        mode=cfg.logging.wandb.mode,
        config=OmegaConf.to_container(cfg, resolve=True),
        id=run_id,
        resume="allow" if run_id else None,
    )
