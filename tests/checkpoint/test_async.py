"""Async save: save() returns before the host copy ends; wait_staged() is the fence that
keeps an in-place update out of the checkpoint being written."""

import pytest
import torch

from scripts.benchlib import run_ranks

pytestmark = pytest.mark.slow


def _save_then_update(rank: int, world: int, run_dir: str) -> dict:
    from checkpoint.manager import CheckpointManager
    from checkpoint.state import ModelState, OptimizerState

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)])  # 64 MB of weights
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    saved = [p.detach().clone() for p in model.parameters()]
    states = {"model": ModelState(model), "optim": OptimizerState(model, optimizer)}
    manager = CheckpointManager(run_dir, states, keep=2, async_save=True, rank=rank, world_size=world)
    manager.save(1)
    manager.wait_staged()
    with torch.no_grad():  # what optimizer.step() does right after the fence; last tensors
        for p in reversed(list(model.parameters())):  # first, where a copy in flight has not been
            p.add_(1.0)
    manager.close()

    fresh = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=1.0)
    reader = CheckpointManager(
        run_dir, {"model": ModelState(fresh), "optim": OptimizerState(fresh, fresh_opt)}, 2, False, rank, world
    )
    found = reader.find("auto")
    reader.load(found)
    equal = all(torch.equal(a, b) for a, b in zip(fresh.parameters(), saved, strict=True))
    return {"equal": equal, "step": found.step}


def test_update_after_wait_staged_stays_out_of_the_checkpoint(tmp_path):
    out = run_ranks(_save_then_update, 1, str(tmp_path))[0]
    assert out["step"] == 1
    assert out["equal"], "the checkpoint holds weights changed after save()"
