"""The CLI as a user runs it: help, dry run, bad input from a real subprocess, and a pipelined
run that trains and resumes at another pp."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import yaml

from launcher.cli import main

CLI = [sys.executable, "-m", "launcher.cli"]


def test_help_explains_commands_and_config_syntax():
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "moe-launch train config=tiny" in out.stdout
    out = subprocess.run([*CLI, "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "config=NAME" in out.stdout and "optim.lr=3e-4" in out.stdout


def test_dry_run_prints_torchrun_command_and_config_and_starts_nothing(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code = main(
        [
            "train",
            "config=tiny",
            "data=synthetic",
            "train.device=cpu",
            f"run_dir={run_dir}",
            "optim.lr=1e-3",
            "--dry-run",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    command, _, config_text = out.partition("\n")
    assert " -m launcher.torchrun --standalone" in command  # torchrun, passing the ranks' exit codes on
    assert command.startswith("env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ")  # fresh store per restart round
    assert " TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120 " in command  # the ranks' time to save after SIGTERM
    assert "--nproc-per-node=2" in command and "--max-restarts=0" in command
    assert "-m framework.train --config" in command and str(run_dir / "config.yaml") in command
    cfg = yaml.safe_load(config_text)
    assert cfg["optim"]["lr"] == 1e-3 and cfg["experiment"] == "tiny"
    assert cfg["run_dir"] == str(run_dir)
    assert not run_dir.exists()


def test_yaml_file_as_config(capsys, tmp_path):
    exp = tmp_path / "my_exp.yaml"
    exp.write_text("defaults:\n  - override /data: synthetic\ntrain:\n  steps: 7\nmodel:\n  num_experts: 4\n")
    code = main(["train", f"config={exp}", "model.top_k=1", "train.device=cpu", "--dry-run"])
    assert code == 0
    cfg = yaml.safe_load(capsys.readouterr().out.partition("\n")[2])
    assert cfg["experiment"] == "my_exp"
    assert (cfg["train"]["steps"], cfg["model"]["num_experts"], cfg["model"]["top_k"]) == (7, 4, 1)


def test_bad_value_from_the_console_script_has_no_traceback(tmp_path):
    # The installed console script where there is one (pip install -e .), else the module it runs.
    exe = [shutil.which("moe-launch")] if shutil.which("moe-launch") else CLI
    cmd = [*exe, "train", "data=synthetic", "train.device=cpu", "model.top_k=99"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip() == "moe-launch: error: model.top_k=99: must be <= model.num_experts=8"


@pytest.mark.slow
def test_dualpipev_trains_from_the_cli_and_resumes_at_another_pp(tmp_path):
    """The issue's command line (made small) trains two steps on two pipeline stages; the next
    launch resumes on one process without a pipeline and starts from the same weights."""
    run_dir = tmp_path / "run"
    small = ["model.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.log_every=1"]
    cli = [*CLI, "train", "config=tiny", "data=synthetic", f"run_dir={run_dir}", "logging.wandb.mode=disabled", *small]
    pp2 = ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "launcher.nproc_per_node=2", "train.steps=2"]
    first = subprocess.run([*cli, *pp2], capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "world 2 (pp 2 x dp_replicate 1 x dp_shard 1, ep 1)" in first.stdout
    again = subprocess.run(
        [*cli, "launcher.nproc_per_node=1", "train.steps=3"], capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "moe-launch: resume: parallel.pp 2 -> 1 (the new value is applied)" in again.stdout
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000002'} at step 2" in again.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    # The validation loss of the weights saved at pp=2, then of the same weights loaded at pp=1.
    saved, resumed = [r["val_loss"] for r in records if r["step"] == 2 and "val_loss" in r]
    assert resumed == pytest.approx(saved, rel=1e-5)
