"""Atomic commit and recovery: a broken checkpoint is skipped for the previous one."""

import shutil

import pytest

from checkpoint.commit import COMMIT_MARKER, check_complete, step_dir_name
from tests.parallel.harness import train_segment

pytestmark = pytest.mark.slow

COMMON = ["train.steps=6", "checkpoint.keep=5"]


@pytest.fixture()
def run_with_two_checkpoints(tmp_path):
    train_segment(tmp_path, 2, COMMON, 2)
    train_segment(tmp_path, 2, COMMON, 4)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [step_dir_name(2), step_dir_name(4)]
    for p in ckpts.iterdir():
        assert check_complete(p) is None
    return tmp_path, ckpts


def test_truncated_shard_is_skipped_with_a_warning(run_with_two_checkpoints, capfd):
    tmp_path, ckpts = run_with_two_checkpoints
    shard = next((ckpts / step_dir_name(4)).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in check_complete(ckpts / step_dir_name(4))
    resumed = train_segment(tmp_path, 2, COMMON, 5)
    assert resumed["start"] == 2
    err = capfd.readouterr().err
    assert f"skipping checkpoint {ckpts / step_dir_name(4)}" in err and "truncated" in err


def test_a_crash_mid_save_leaves_nothing_that_looks_complete(run_with_two_checkpoints):
    """What a kill during a write leaves: a .tmp directory (never renamed), or a directory
    without the marker. Neither is used; the next start resumes from step 4."""
    tmp_path, ckpts = run_with_two_checkpoints
    partial = ckpts / (step_dir_name(6) + ".tmp")
    shutil.copytree(ckpts / step_dir_name(4), partial)
    (partial / COMMIT_MARKER).unlink()
    unmarked = ckpts / step_dir_name(5)
    shutil.copytree(ckpts / step_dir_name(4), unmarked)
    (unmarked / COMMIT_MARKER).unlink()
    resumed = train_segment(tmp_path, 2, COMMON, 6)
    assert resumed["start"] == 4
    assert not partial.exists()  # the next save of step 6 replaced the leftover


def test_retention_keeps_the_newest(tmp_path):
    train_segment(tmp_path, 1, ["train.steps=6", "checkpoint.keep=2", "checkpoint.interval=1"], 1)
    for stop in (2, 3, 4):
        train_segment(tmp_path, 1, ["train.steps=6", "checkpoint.keep=2"], stop)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [step_dir_name(3), step_dir_name(4)]
