"""Atomic commit, checksums and recovery: a broken checkpoint is skipped for the previous one,
never counted as kept, and a failed commit stops every rank at once."""

import shutil
import time

import pytest
import torch

from checkpoint.commit import COMMIT_MARKER, TRAINER_STATE, check_checkpoint, check_complete, step_dir_name
from checkpoint.export import ExportError, export
from scripts.benchlib import run_ranks
from tests.parallel.harness import train_segment

pytestmark = pytest.mark.slow

COMMON = ["train.steps=6", "checkpoint.keep=2"]
LAUNCHED_CONFIG = "experiment: test\ntrain:\n  steps: 6\n"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Trained once per module: 2 ranks, checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("two")
    (run_dir / "config.yaml").write_text(LAUNCHED_CONFIG)  # as the launcher leaves it
    train_segment(run_dir, 2, COMMON, 2)
    train_segment(run_dir, 2, COMMON, 4)
    return run_dir


@pytest.fixture()
def run_with_two_checkpoints(two_checkpoints, tmp_path):
    """A fresh copy of that run for each test to break."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [step_dir_name(2), step_dir_name(4)]
    for p in ckpts.iterdir():
        assert check_checkpoint(p) is None
    return run_dir, ckpts


def _flip(path, offset: int | None = None) -> None:
    """Change 8 bytes in place (sign bits and all), the size stays: only a checksum sees it."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, min(at + 8, len(data))):
        data[i] ^= 0x80
    path.write_bytes(bytes(data))


CORRUPTIONS = {  # file kind -> the file of a checkpoint, and where in it to flip
    "shard": (lambda d: sorted(d.glob("*.distcp"))[-1], None),
    "metadata": (lambda d: d / ".metadata", 40),
    "trainer state": (lambda d: d / TRAINER_STATE, 2),
    "rng state": (lambda d: d / "rng-rank00001.pt", None),
    "config": (lambda d: d / "config.yaml", 0),
}


def _find_newest(rank: int, world: int, run_dirs: list[str]) -> list[int]:
    from checkpoint.manager import CheckpointManager

    return [CheckpointManager(d, {}, 2, False, rank, world).find("auto").step for d in run_dirs]


def test_a_changed_byte_in_any_file_is_skipped_with_a_warning_naming_it(run_with_two_checkpoints, tmp_path, capfd):
    run_dir, ckpts = run_with_two_checkpoints
    newest = ckpts / step_dir_name(4)
    copies = {}
    for kind, (pick, offset) in CORRUPTIONS.items():
        copy = tmp_path / "copies" / kind.replace(" ", "_")
        shutil.copytree(ckpts, copy / "checkpoints")
        target = pick(copy / "checkpoints" / step_dir_name(4))
        _flip(target, offset)
        assert check_complete(target.parent) is None  # sizes and marker alone would pass it
        assert f"{target.name} is corrupt" in check_checkpoint(target.parent)
        copies[kind] = (copy, target)
    capfd.readouterr()
    steps = run_ranks(_find_newest, 2, [str(c) for c, _ in copies.values()])[0]
    assert steps == [2] * len(copies)  # every one falls back to the previous checkpoint
    warnings = [line for line in capfd.readouterr().err.splitlines() if "skipping checkpoint" in line]
    assert len(warnings) == len(copies)  # one line each, no traceback
    for (_, target), line in zip(copies.values(), warnings, strict=True):
        assert str(target.parent) in line and f"{target.name} is corrupt" in line

    # The real trainer falls back too, and export uses the previous checkpoint or names the file.
    shard_run, shard = copies["shard"]
    resumed = train_segment(shard_run, 2, COMMON, 5)
    assert resumed["start"] == 2
    assert export(shard_run, tmp_path / "w.pt")[0].name == step_dir_name(5)
    with pytest.raises(ExportError, match=f"{shard.name} is corrupt"):
        export(shard_run, tmp_path / "w.pt", step=4)
    assert check_checkpoint(newest) is None  # the original was never touched


def test_a_broken_checkpoint_does_not_count_toward_keep(run_with_two_checkpoints):
    """keep=2 with step 4 corrupt: the save of step 6 keeps 6 and 2 (the two verified ones);
    before checksums the good step 2 was deleted and the broken step 4 kept."""
    run_dir, ckpts = run_with_two_checkpoints
    _flip(sorted((ckpts / step_dir_name(4)).glob("*.distcp"))[0])
    resumed = train_segment(run_dir, 2, COMMON, 6)
    assert resumed["start"] == 2
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [step_dir_name(2), step_dir_name(4), step_dir_name(6)]
    assert check_checkpoint(ckpts / step_dir_name(2)) is None


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
    without the marker. Neither is used; the next start resumes from step 4 and removes the
    leftover at start-up (it stops at step 5, so no save of step 6 can be what removed it)."""
    tmp_path, ckpts = run_with_two_checkpoints
    partial = ckpts / (step_dir_name(6) + ".tmp")
    shutil.copytree(ckpts / step_dir_name(4), partial)
    (partial / COMMIT_MARKER).unlink()
    unmarked = ckpts / step_dir_name(5)
    shutil.copytree(ckpts / step_dir_name(4), unmarked)
    (unmarked / COMMIT_MARKER).unlink()
    resumed = train_segment(tmp_path, 2, COMMON, 5)
    assert resumed["start"] == 4
    assert not partial.exists()
    assert check_checkpoint(unmarked) is None  # step 5's save replaced the unmarked directory


def test_retention_keeps_the_newest(tmp_path):
    train_segment(tmp_path, 1, ["train.steps=6", "checkpoint.keep=2", "checkpoint.interval=1"], 1)
    for stop in (2, 3, 4):
        train_segment(tmp_path, 1, ["train.steps=6", "checkpoint.keep=2"], stop)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [step_dir_name(3), step_dir_name(4)]


def _commit_fails_on_rank_0(rank: int, world: int, run_dir: str) -> list:
    import checkpoint.manager as manager_mod
    from checkpoint.manager import CheckpointManager, CommitError
    from checkpoint.state import ModelState

    if rank == 0:

        def disk_full(path):
            raise OSError(28, "No space left on device", str(path))

        manager_mod.fsync_dir = disk_full
    results = []
    for async_save in (False, True):
        manager = CheckpointManager(run_dir, {"model": ModelState(torch.nn.Linear(4, 4))}, 2, async_save, rank, world)
        start = time.monotonic()
        try:
            manager.save(1)
            manager.wait()
            message = None
        except CommitError as err:
            message = str(err)
        results.append((message, time.monotonic() - start))
        manager.close()  # after the failure: safe, and again
        manager.close()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    return gathered


def test_a_commit_failing_on_rank_0_stops_every_rank_at_once(tmp_path):
    """Sync and async: rank 0 fails inside the commit; every rank raises the same one-line error
    within seconds (the collective timeout is 600 s), and nothing looks committed."""
    gathered = run_ranks(_commit_fails_on_rank_0, 2, str(tmp_path))[0]
    for rank_results in gathered:
        for message, seconds in rank_results:
            assert message is not None and "\n" not in message
            assert "step-00000001 was not committed" in message and "No space left on device" in message
            assert seconds < 30
    assert not (tmp_path / "checkpoints" / step_dir_name(1)).exists()


def _save_rng(rank: int, world: int, run_dir: str) -> list:
    from checkpoint.manager import CheckpointManager
    from checkpoint.state import RngState

    torch.manual_seed(7)  # every rank seeds the same, as the Trainer does
    torch.rand(3 + rank)  # then the ranks' streams part (e.g. rank-dependent work)
    manager = CheckpointManager(run_dir, {"rng": RngState()}, 2, False, rank, world)
    manager.save(1)
    manager.close()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, torch.rand(4))  # what each rank draws next
    return gathered


def _resume_rng(rank: int, world: int, run_dir: str) -> dict:
    from checkpoint.manager import CheckpointManager
    from checkpoint.state import RngState

    manager = CheckpointManager(run_dir, {"rng": RngState()}, 2, False, rank, world)
    manager.load(manager.find("auto"))
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, torch.rand(4))
    return {"draws": gathered, "note": manager.resume_note}


def test_rng_on_another_world_size_continues_rank_0s_stream_and_says_so(tmp_path):
    saved = run_ranks(_save_rng, 2, str(tmp_path))[0]
    assert not torch.equal(saved[0], saved[1])
    same = run_ranks(_resume_rng, 2, str(tmp_path))[0]
    assert all(torch.equal(a, b) for a, b in zip(same["draws"], saved, strict=True)) and same["note"] == ""
    other = run_ranks(_resume_rng, 3, str(tmp_path))[0]
    assert all(torch.equal(draw, saved[0]) for draw in other["draws"])  # the global stream, on every rank
    assert other["note"].startswith("world size 2 -> 3: every rank continues rank 0's rng state")
