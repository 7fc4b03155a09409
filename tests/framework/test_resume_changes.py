"""After a resume the new optimizer config wins over the checkpoint's: peak LR, schedule length,
betas, weight decay. Unit-level on one process, then once through the CLI with real ranks."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from framework.config import OptimConfig
from framework.optim import build_lr_scheduler, build_optimizer, lr_factor
from framework.resume_changes import apply_optim_config, apply_resume_changes


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _resumed(model, old_cfg, old_total: int, new_cfg, new_total: int, steps_done: int):
    """Train with the old config, then build from the new one and load the old state, as a rank does."""
    optimizer = build_optimizer(model, old_cfg)
    scheduler = build_lr_scheduler(optimizer, old_cfg, old_total)
    _train(model, optimizer, scheduler, steps_done)
    saved = optimizer.state_dict(), scheduler.state_dict()
    new_optimizer = build_optimizer(model, new_cfg)
    new_scheduler = build_lr_scheduler(new_optimizer, new_cfg, new_total)
    new_optimizer.load_state_dict(saved[0])
    new_scheduler.load_state_dict(saved[1])
    return new_optimizer, new_scheduler


def test_new_peak_lr_schedule_length_and_hyper_parameters_win_after_load():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    old = OmegaConf.structured(OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.1, beta2=0.95))
    new = OmegaConf.structured(OptimConfig(lr=5e-4, warmup_steps=2, weight_decay=0.02, beta2=0.99, eps=1e-6))
    optimizer, scheduler = _resumed(model, old, 10, new, 20, steps_done=4)
    # What loading alone leaves: the checkpoint's peak LR and betas.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(4, 10, 2, "cosine", 0.1))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    exp_avg = [s["exp_avg"].clone() for s in optimizer.state.values()]

    apply_optim_config(model, optimizer, scheduler, new)
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.02, 0.0)
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.99) and decay["eps"] == 1e-6
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, optimizer.state.values(), strict=True))
    for step in range(4, 8):  # the LR of every later step: new peak, new length
        expected = 5e-4 * lr_factor(step, 20, 2, "cosine", 0.1)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected, expected])
        assert scheduler.get_last_lr() == pytest.approx([expected, expected])
        _train(model, optimizer, scheduler, 1)


def test_resume_is_marked_in_the_metrics_and_a_fresh_start_is_untouched():
    model = nn.Linear(4, 4)
    cfg = OmegaConf.structured(OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0))
    optimizer, scheduler = _resumed(model, cfg, 10, OmegaConf.merge(cfg, {"lr": 2e-3}), 10, steps_done=3)
    logged = []
    logger = SimpleNamespace(log=logged.append)
    apply_resume_changes(None, model, optimizer, scheduler, cfg, logger)
    assert logged == [] and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    found = SimpleNamespace(step=3, path="RUN/checkpoints/step-00000003")
    apply_resume_changes(found, model, optimizer, scheduler, OmegaConf.merge(cfg, {"lr": 2e-3}), logger)
    assert logged == [{"step": 3, "event": "resume", "checkpoint": "RUN/checkpoints/step-00000003", "lr": 2e-3}]


@pytest.mark.slow
def test_a_resumed_run_trains_with_the_new_learning_rate(tmp_path):
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "launcher.cli", "train", "config=tiny", "data=synthetic", f"run_dir={run_dir}"]
    cli += ["model.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1"]
    cli += ["logging.wandb.mode=disabled", "optim.warmup_steps=0", "optim.schedule=constant"]
    first = subprocess.run([*cli, "train.steps=2", "optim.lr=1e-3"], capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([*cli, "train.steps=4", "optim.lr=2e-3"], capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "moe-launch: resume: optim.lr 0.001 -> 0.002" in again.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("time" in r for r in records)
    lrs = {r["step"]: r["lr"] for r in records if "loss" in r}
    assert lrs == pytest.approx({1: 1e-3, 2: 1e-3, 3: 2e-3, 4: 2e-3})
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 2 and resumes[0]["lr"] == pytest.approx(2e-3)
    assert resumes[0]["checkpoint"] == str(run_dir / "checkpoints" / "step-00000002")
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == [
        "config.segment-1.yaml",
        "config.segment-2.yaml",
        "config.yaml",
    ]
