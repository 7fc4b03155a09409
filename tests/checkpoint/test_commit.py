"""The on-disk contract: what a committed checkpoint holds besides the tensors."""

import pytest
import torch

from checkpoint.commit import CHECKPOINTS_DIR, check_complete, read_checkpoint_config, step_dir_name
from tests.parallel.spawn import run_workers

LAUNCHED = "experiment: launched\noptim:\n  lr: 0.001\n"


def _save_after_config_rewritten(rank: int, world: int, run_dir: str) -> bool:
    from pathlib import Path

    from checkpoint.manager import CheckpointManager
    from checkpoint.state import ModelState

    manager = CheckpointManager(run_dir, {"model": ModelState(torch.nn.Linear(4, 4))}, 2, False, rank, world)
    (Path(run_dir) / "config.yaml").write_text("experiment: a later launch\n")  # while this one runs
    manager.save(3)
    manager.close()
    return True


@pytest.mark.slow
def test_checkpoint_holds_the_config_its_segment_was_launched_with(tmp_path):
    (tmp_path / "config.yaml").write_text(LAUNCHED)
    run_workers(_save_after_config_rewritten, 1, str(tmp_path))
    ckpt = tmp_path / CHECKPOINTS_DIR / step_dir_name(3)
    assert check_complete(ckpt) is None
    assert read_checkpoint_config(ckpt) == LAUNCHED


def test_an_older_checkpoint_without_a_config_reads_as_none(tmp_path):
    assert read_checkpoint_config(tmp_path) is None
