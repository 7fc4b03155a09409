"""The on-disk contract: what a committed checkpoint holds besides the tensors."""

import json

import pytest
import torch

from checkpoint.checksum import checksum_bytes
from checkpoint.commit import (
    CHECKPOINTS_DIR,
    COMMIT_MARKER,
    check_checkpoint,
    check_complete,
    marker_text,
    read_checkpoint_config,
    step_dir_name,
)
from scripts.benchlib import run_ranks

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
    run_ranks(_save_after_config_rewritten, 1, str(tmp_path))[0]
    ckpt = tmp_path / CHECKPOINTS_DIR / step_dir_name(3)
    assert check_complete(ckpt) is None
    assert read_checkpoint_config(ckpt) == LAUNCHED


def test_an_older_checkpoint_without_a_config_reads_as_none(tmp_path):
    assert read_checkpoint_config(tmp_path) is None


def test_a_changed_byte_is_named_and_a_marker_without_checksums_is_taken_on_sizes(tmp_path):
    files = {"__0_0.distcp": b"\x00" * 1000, ".metadata": b"meta" * 10}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / COMMIT_MARKER).write_text(marker_text({n: (len(d), checksum_bytes(d)) for n, d in files.items()}))
    assert check_checkpoint(tmp_path) is None
    (tmp_path / "__0_0.distcp").write_bytes(b"\x00" * 999 + b"\x01")
    assert check_complete(tmp_path) is None
    assert check_checkpoint(tmp_path).startswith("__0_0.distcp is corrupt")
    assert check_checkpoint(tmp_path, verify=False) is None
    (tmp_path / COMMIT_MARKER).write_text(json.dumps({"files": {n: len(d) for n, d in files.items()}}))
    assert check_checkpoint(tmp_path) is None  # written before checksums: sizes only
    (tmp_path / COMMIT_MARKER).write_text("{not json")
    assert check_checkpoint(tmp_path) == "unreadable COMMITTED marker"
