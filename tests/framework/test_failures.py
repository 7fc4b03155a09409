"""Failures that cost at most one checkpoint interval: a rank killed by SIGKILL, a node lost."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from framework.distributed import free_port
from launcher.local import TORCHRUN_ENV
from tests.framework.processes import process_tree, rank_pids, signal_all
from tests.parallel.harness import make_config

pytestmark = pytest.mark.slow

INTERVAL = 2


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _trained_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _records(run_dir) if "loss" in r]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the job ended early with {proc.returncode}: {err[-3000:]}")
        time.sleep(0.3)


def test_sigkill_of_one_rank_restarts_and_finishes(tmp_path):
    run_dir = tmp_path / "run"
    steps = 12
    cli = [
        sys.executable, "-m", "launcher.cli", "train", "config=tiny", "data=synthetic", "train.device=cpu",
        "model.seq_len=32",
        f"run_dir={run_dir}", f"train.steps={steps}", "train.log_every=1", "train.global_batch_size=4",
        "train.micro_batch_size=2", f"checkpoint.interval={INTERVAL}",
        "launcher.max_restarts=1",  # one restart must be enough: each round gets a fresh store
        "train.collective_timeout_s=30",  # a rank waiting on the dead peer fails fast
        "logging.wandb.mode=disabled",
    ]  # fmt: skip
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(_trained_steps(run_dir)) >= 5, 180, proc)
    killed_after = max(_trained_steps(run_dir))
    victims = rank_pids(run_dir / "config.yaml")
    assert len(victims) == 2
    os.kill(victims[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out
    resumed_at = int(out.split("resumed from")[1].split("at step")[1].split()[0])
    assert killed_after - resumed_at <= INTERVAL + 1  # lost at most one interval (+ the step in flight)
    assert max(_trained_steps(run_dir)) == steps


def test_node_loss_reforms_at_half_the_world_and_reshards(tmp_path):
    """Two torchrun agents on localhost emulate two nodes (2 ranks each, ep=2). Killing one
    agent and its ranks leaves one node: it re-forms the group with 2 ranks, dp_replicate
    shrinks from 2 to 1, the checkpoint reshards, and training finishes."""
    run_dir = tmp_path / "run"
    steps = 14
    cfg = make_config(
        run_dir,
        2,
        [
            f"train.steps={steps}", "train.log_every=1", f"checkpoint.interval={INTERVAL}",
            "parallel.ep=2", "parallel.dp_shard=2", "parallel.dp_replicate=auto",
            "train.collective_timeout_s=30",  # a rank stuck waiting for a dead peer fails fast
        ],
    )  # fmt: skip
    run_dir.mkdir(parents=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg))
    port = free_port()
    agent = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=node-loss-test",
        "--rdzv-conf=join_timeout=60,last_call_timeout=5", "--max-restarts=10", "--monitor-interval=0.5",
        "-m", "framework.train", "--config", str(config_path),
    ]  # fmt: skip
    env = {**os.environ, **TORCHRUN_ENV}
    survivor = subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # The survivor must host the rendezvous store (the first agent to bind the port does): were
    # it the doomed one, the store would die with it. A fixed sleep lost that race under load.
    _wait_for(lambda: _listening(port), 120, survivor)
    doomed = subprocess.Popen(
        agent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    _wait_for(lambda: len(_trained_steps(run_dir)) >= 5, 240, survivor)
    start_line = next(r for r in _records(run_dir) if "memory_per_rank" in r)
    assert len(start_line["memory_per_rank"]) == 4  # both nodes took part
    doomed_tree = process_tree(doomed.pid)
    assert len(doomed_tree) >= 3  # the agent and its 2 ranks
    for pid in doomed_tree:  # the whole "node" dies at once
        os.kill(pid, signal.SIGKILL)
    doomed.wait()
    out, err = survivor.communicate(timeout=400)
    assert survivor.returncode == 0, err[-3000:]
    assert "resumed from" in out
    assert "world 2 (pp 1 x dp_replicate 1 x dp_shard 2, ep 2)" in out
    assert max(_trained_steps(run_dir)) == steps


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    """The job is frozen (SIGSTOP) the moment a save's shard files appear in step-N.tmp, and
    killed with SIGKILL only if the save is then really unfinished (the rename to step-N
    has not happened); otherwise it is let go and caught at a later save. The next start
    must skip the half-written one and resume from the previous checkpoint."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    cli = [
        sys.executable, "-m", "launcher.cli", "train", "config=tiny", "data=synthetic", "train.device=cpu",
        "model.seq_len=32",
        f"run_dir={run_dir}", "train.steps=100000", "train.log_every=1", "train.global_batch_size=4",
        "train.micro_batch_size=2", "checkpoint.interval=1", "checkpoint.keep=100", "logging.wandb.mode=disabled",
    ]  # fmt: skip
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    caught = None
    deadline = time.time() + 240
    try:
        while caught is None:
            assert time.time() < deadline, "never caught a save in progress"
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            partial = list(ckpts.glob("step-*.tmp")) if ckpts.is_dir() else []
            writing = partial and any(partial[0].glob("*.distcp"))  # shard files being written
            if not writing or not any(ckpts.glob("step-????????")):  # after one committed checkpoint
                time.sleep(0.001)
                continue
            tree = process_tree(proc.pid)
            signal_all(tree, signal.SIGSTOP)
            tmp = partial[0]
            if tmp.is_dir() and not (ckpts / tmp.name.removesuffix(".tmp")).exists():
                caught = tmp
                signal_all(tree, signal.SIGKILL)
            else:  # the save finished between the look and the freeze: try the next one
                signal_all(tree, signal.SIGCONT)
    finally:
        signal_all(process_tree(proc.pid), signal.SIGKILL)
        proc.communicate()
    assert any(caught.glob("*.distcp")) and not (caught / "COMMITTED").exists()  # killed mid-write
    caught_step = int(caught.name.removeprefix("step-").removesuffix(".tmp"))
    committed = sorted(int(p.name.removeprefix("step-")) for p in ckpts.glob("step-????????"))
    assert committed[-1] == caught_step - 1  # interval 1: the previous step's is the newest whole one

    resume = [a if a != "train.steps=100000" else f"train.steps={caught_step + 1}" for a in cli]
    again = subprocess.run(resume, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpts / f'step-{caught_step - 1:08d}'} at step {caught_step - 1}" in again.stdout
    assert not caught.exists()  # the leftover is gone; step N was written again, whole
    assert (ckpts / f"step-{caught_step:08d}" / "COMMITTED").exists()
