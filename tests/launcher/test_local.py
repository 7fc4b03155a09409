"""The local backend with real processes: the ranks' own exit codes reach the user, and Ctrl-C
stops like SIGTERM (finish the step, save, one line) instead of a traceback per process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from launcher.local import AGENT_MODULE, INTERRUPTED_EXIT_CODE, LocalLauncher, StopSignals

pytestmark = pytest.mark.slow

RANK_SCRIPT = "import os, sys; sys.exit(int(sys.argv[1]) if os.environ['RANK'] == '0' else 0)"


@pytest.mark.parametrize("code", [2, 3, 1])
def test_a_ranks_exit_code_reaches_the_user(code, tmp_path, capfd):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "launcher": {"stop_timeout_s": 5}})
    command = [sys.executable, "-m", AGENT_MODULE, "--standalone", "--nproc-per-node=2", str(script), str(code)]
    assert LocalLauncher().launch(cfg, command) == code
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ChildFailedError" not in err
    # 2 (no checkpoint) and 3 (non-finite): the rank printed its own line; anything else gets one
    assert ("rank 0 exited with code 1; its output is above" in err) == (code == 1)


def test_a_stop_signal_caught_before_the_start_starts_nothing_and_says_so(tmp_path, capfd):
    """cli.train catches stop signals from before it writes the run dir: one that arrives before
    torchrun starts is reported in one line (no requeue), and torchrun is never started."""
    marker = tmp_path / "started"
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "launcher": {"stop_timeout_s": 5}})
    stop, before = StopSignals(), signal.getsignal(signal.SIGTERM)
    with stop.catching():
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. while the resolved config is being written
        code = LocalLauncher().launch(cfg, [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], stop)
    assert code == 1 and not marker.exists()
    err = capfd.readouterr().err
    assert "stopped by SIGTERM but the ranks committed no new checkpoint (newest: none; torchrun not started)" in err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler in place before is back


def test_ctrl_c_finishes_the_step_saves_and_prints_one_line(tmp_path):
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "launcher.cli", "train", "config=tiny", "data=synthetic", f"run_dir={run_dir}"]
    cli += ["model.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1"]
    cli += ["logging.wandb.mode=disabled", "train.steps=100000"]
    # Its own session, like a shell's foreground job: Ctrl-C signals the whole group.
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("moe-launch:")]
    assert len(stops) == 1 and "checkpoint saved" in stops[0], err[-3000:]
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert len(saved) == 1
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert json.loads((saved[0] / "trainer_state.json").read_text())["step"] >= max(logged)
