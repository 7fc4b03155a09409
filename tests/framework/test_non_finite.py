"""A non-finite loss stops the run without saving (on_nan=stop) or skips the step (skip).

The real loop (Trainer.run) saves after every step (checkpoint.interval=1), so a run that
went on past the poisoned step, or saved it, would leave a checkpoint these tests see.
"""

import pytest
import torch
from omegaconf import OmegaConf

from checkpoint.commit import check_complete
from framework.exit_codes import NON_FINITE_EXIT_CODE
from scripts.benchlib import run_ranks
from tests.parallel.harness import make_config

pytestmark = pytest.mark.slow

POISONED_STEP = 3
EVERY_STEP = ["train.steps=4", "checkpoint.interval=1", "checkpoint.keep=10", "train.eval_every=100"]


def _run_with_a_poisoned_step(rank: int, world: int, cfg_yaml: str) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer, TrainingStopped

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))

    def poison(module, args, output):  # the training forward of one step, rank 0 only: the loss becomes NaN
        return output * float("nan") if module.training and trainer.step == POISONED_STEP - 1 and rank == 0 else output

    trainer.model.head.register_forward_hook(poison)
    outcome = {"stopped": None, "exit_code": None}
    try:
        trainer.run()
    except TrainingStopped as stop:
        outcome["stopped"], outcome["exit_code"] = str(stop), stop.exit_code
    outcome["step"] = trainer.step
    params = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.model.parameters()]
    outcome["finite"] = all(bool(torch.isfinite(p).all()) for p in params)
    root = trainer.checkpoints.root
    outcome["checkpoints"] = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    outcome["complete"] = all(check_complete(p) is None for p in root.iterdir()) if root.is_dir() else True
    return outcome


def test_on_nan_stop_ends_the_run_and_saves_nothing_after_the_bad_step(tmp_path):
    cfg = make_config(tmp_path, 2, ["train.on_nan=stop", *EVERY_STEP])
    out = run_ranks(_run_with_a_poisoned_step, 2, OmegaConf.to_yaml(cfg))[0]
    assert out["stopped"].startswith(f"non-finite loss or gradient at step {POISONED_STEP}")
    assert out["exit_code"] == NON_FINITE_EXIT_CODE and out["step"] == POISONED_STEP - 1
    # The steps before were saved in the loop; nothing of the poisoned step or after.
    assert out["checkpoints"] == ["step-00000001", "step-00000002"] and out["complete"]
    assert out["finite"]


def test_on_nan_skip_leaves_weights_finite_and_saves_every_step(tmp_path):
    cfg = make_config(tmp_path, 2, ["train.on_nan=skip", *EVERY_STEP])
    out = run_ranks(_run_with_a_poisoned_step, 2, OmegaConf.to_yaml(cfg))[0]
    assert out["stopped"] is None and out["step"] == 4
    assert out["finite"]
    assert out["checkpoints"] == [f"step-{s:08d}" for s in (1, 2, 3, 4)] and out["complete"]
