"""End to end: `moe-launch train` starts 2 gloo ranks that train, evaluate and log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "launcher.cli", "train"]
FAKE_KEY = "wandb-test-secret-0123456789abcdef0123456789"


def _train(run_dir: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "config=tiny", "data=synthetic", "train.device=cpu", f"run_dir={run_dir}", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_API_KEY": FAKE_KEY},
    )


def test_two_process_training_lowers_loss_and_logs_metrics(tmp_path):
    run_dir = tmp_path / "run"
    out = _train(
        run_dir,
        "train.steps=40",
        "train.log_every=10",
        "train.eval_every=20",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",  # 2 micro-batches per rank: gradient accumulation runs
        "model.seq_len=64",
        "data.synthetic_tokens=200000",
        "logging.wandb.mode=offline",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40]
    for r in train_records:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "load_imbalance", "expert_tokens"):
            assert key in r, key
        assert len(r["load_imbalance"]) == 3 + 1  # 3 MoE blocks + the MTP block
        assert r["max_load_imbalance"] >= 1.0 and 0 < r["mfu"] < 1
        # every routed (token, slot) of the step is counted once, summed over both ranks
        assert sum(r["expert_tokens"][0]) == 8 * 64 * 2
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 20, 40]
    assert vals[-1] < vals[0] - 0.5
    memory = next(r for r in records if "memory_per_rank" in r)["memory_per_rank"]
    assert len(memory) == 2 and all(m["param_bytes"] > 0 and m["optimizer_bytes"] > 0 for m in memory)
    assert "validation loss: first" in out.stdout
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline files belong in the run dir"
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert FAKE_KEY.encode() not in f.read_bytes(), f"API key leaked into {f}"
    assert FAKE_KEY not in out.stdout + out.stderr
