"""The per-node task of a SLURM job without SLURM: SIGUSR1 to its whole process tree (what SLURM
does to a job step) must not kill torchrun; the ranks save and the task exits 75."""

import json
import signal
import subprocess
import sys
import time

import pytest

from launcher.compose import compose_config
from launcher.local import LocalLauncher
from launcher.run_dir import finalize_paths, write_resolved_config
from launcher.run_metrics import read_records
from tests.framework.processes import process_tree, signal_all

pytestmark = pytest.mark.slow


def test_usr1_to_every_process_of_the_task_saves_and_asks_for_a_requeue(tmp_path):
    cfg = compose_config(
        "tiny",
        [
            "data=synthetic",
            "logging.wandb.mode=disabled",
            "launcher.nproc_per_node=1",
            "train.steps=100000",
            "train.log_every=1",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    finalize_paths(cfg)
    config_path = write_resolved_config(cfg)
    torchrun = LocalLauncher().command(cfg, config_path)
    task = [sys.executable, "-m", "launcher.slurm_node", "--config", str(config_path), "--", *torchrun]
    proc = subprocess.Popen(task, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not any("loss" in r for r in read_records(cfg.run_dir)) and proc.poll() is None:
        assert time.monotonic() < deadline, "training never got going"
        time.sleep(0.2)
    tree = process_tree(proc.pid)
    assert len(tree) >= 3  # the task, torchrun, the rank
    signal_all(tree, signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    (saved,) = (tmp_path / "run" / "checkpoints").iterdir()
    step = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert step >= max(r["step"] for r in read_records(cfg.run_dir) if "loss" in r)
