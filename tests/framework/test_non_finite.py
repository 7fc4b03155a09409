"""A non-finite loss stops the run without saving (on_nan=stop) or skips the step (skip)."""

import pytest
import torch
from omegaconf import OmegaConf

from tests.parallel.harness import make_config
from scripts.benchlib import run_ranks

pytestmark = pytest.mark.slow


def _train_with_a_poisoned_step(rank: int, world: int, cfg_yaml: str) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer, TrainingStopped

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))

    def poison(module, args, output):  # step 3 on rank 0 only: the loss becomes NaN
        return output * float("nan") if trainer.step == 2 and rank == 0 else output

    trainer.model.head.register_forward_hook(poison)
    outcome = {"stopped": None, "steps": 0}
    try:
        while trainer.step < 4:
            trainer.train_step()
            trainer.step += 1
            outcome["steps"] = trainer.step
        trainer.save()
    except TrainingStopped as stop:
        outcome["stopped"] = str(stop)
    params = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.model.parameters()]
    outcome["finite"] = all(bool(torch.isfinite(p).all()) for p in params)
    outcome["checkpoints"] = sorted(p.name for p in trainer.checkpoints.root.glob("step-*"))
    return outcome


def test_on_nan_stop_ends_the_run_and_saves_nothing(tmp_path):
    cfg = make_config(tmp_path, 2, ["train.on_nan=stop", "train.steps=4"])
    out = run_ranks(_train_with_a_poisoned_step, 2, OmegaConf.to_yaml(cfg))[0]
    assert out["stopped"].startswith("non-finite loss or gradient at step 3")
    assert out["steps"] == 2 and out["checkpoints"] == []


def test_on_nan_skip_leaves_weights_finite_and_saves(tmp_path):
    cfg = make_config(tmp_path, 2, ["train.on_nan=skip", "train.steps=4"])
    out = run_ranks(_train_with_a_poisoned_step, 2, OmegaConf.to_yaml(cfg))[0]
    assert out["stopped"] is None and out["steps"] == 4
    assert out["finite"] and out["checkpoints"] == ["step-00000004"]
