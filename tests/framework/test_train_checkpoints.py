"""Checkpoints through the real CLI: SIGTERM saves and asks for a requeue, async save commits."""

import json
import signal
import subprocess
import sys
import time

import pytest

from checkpoint.commit import check_complete
from tests.framework.processes import rank_pids, signal_all

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "launcher.cli", "train", "config=tiny", "data=synthetic", "train.device=cpu"]
SMALL = ["model.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "logging.wandb.mode=disabled"]


def _start_long_run(run_dir, *overrides: str) -> subprocess.Popen:
    """A run with far more steps than a test waits for, to be stopped by a signal."""
    cli = [*CLI, *SMALL, f"run_dir={run_dir}", "train.steps=100000", "train.log_every=1", *overrides]
    return subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, run_dir, steps: int) -> None:
    deadline = time.time() + 180
    while len(_logged_steps(run_dir)) < steps and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)


def _logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize(
    "saving",
    [[], ["checkpoint.async=true", "checkpoint.interval=1", "checkpoint.keep=1"]],
    ids=["sync", "async-save-every-step"],
)
def test_sigterm_saves_a_checkpoint_and_exits_with_the_requeue_code(saving, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_long_run(run_dir, *saving)
    _wait_for_steps(proc, run_dir, 3)
    assert _logged_steps(run_dir), "training never got going"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert (run_dir / "checkpoints").is_dir(), err[-3000:]
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 1 and check_complete(ckpts[0]) is None
    saved_step = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert saved_step >= max(_logged_steps(run_dir))  # nothing trained was lost
    assert "checkpoint saved, requeue to resume" in err

    # The requeued job picks it up on its own (resume=auto) and finishes.
    again = subprocess.run(
        [*CLI, *SMALL, f"run_dir={run_dir}", f"train.steps={saved_step + 2}"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {saved_step}" in again.stdout


def test_a_signal_before_any_save_is_not_reported_as_requeue(tmp_path):
    """SIGTERM while the ranks are still starting (no handler yet, nothing saved): the exit
    code must not say "saved, requeue me"."""
    run_dir = tmp_path / "run"
    proc = _start_long_run(run_dir)
    deadline = time.time() + 60
    while not (run_dir / "config.yaml").exists() and time.time() < deadline:  # written just before torchrun
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, 75), err[-2000:]
    assert "stopped by SIGTERM but the ranks committed no new checkpoint (newest: none" in err
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").glob("step-????????"))


def test_ranks_that_cannot_save_within_the_stop_timeout_are_killed_and_not_requeued(tmp_path):
    """The ranks are frozen (SIGSTOP), so they cannot act on the SIGTERM torchrun passes on:
    after launcher.stop_timeout_s=2 torchrun kills them (its own default would wait 30 s),
    and moe-launch reports that nothing was saved instead of asking for a requeue."""
    run_dir = tmp_path / "run"
    proc = _start_long_run(run_dir, "launcher.stop_timeout_s=2")
    _wait_for_steps(proc, run_dir, 2)
    ranks = rank_pids(run_dir / "config.yaml")
    assert len(ranks) == 2, "training never got going"
    signal_all(ranks, signal.SIGSTOP)
    stopped_at = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert time.time() - stopped_at < 20, "torchrun did not use the 2 s stop timeout"
    assert proc.returncode not in (0, 75), err[-2000:]
    assert "stopped by SIGTERM but the ranks committed no new checkpoint (newest: none" in err


def test_async_checkpoints_commit_and_resume_refuses_a_bad_path(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [*CLI, *SMALL, f"run_dir={run_dir}", "train.steps=6", "checkpoint.interval=2", "checkpoint.async=true"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004", "step-00000006"]
    assert all(check_complete(run_dir / "checkpoints" / n) is None for n in names)

    bad = subprocess.run([*CLI, *SMALL, f"resume={tmp_path / 'nope'}"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith(f"moe-launch: error: resume={tmp_path / 'nope'}:")
