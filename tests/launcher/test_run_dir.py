"""The run directory: unique default names, one config file per launch, paths against the
project, and one line (exit 2) when it cannot be created."""

import os
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.run_dir import PROJECT_DIR

BASE = ["train", "data=synthetic", "logging.wandb.mode=disabled"]


@pytest.fixture
def launches(monkeypatch):
    """Every step up to starting torchrun is real; records the config each launch would run."""
    configs = []

    def fake_launch(self, cfg, command, stop=None):
        configs.append(Path(command[-1]))
        return 0

    monkeypatch.setattr("launcher.local.LocalLauncher.launch", fake_launch)
    return configs


def test_launches_in_the_same_second_get_their_own_default_run_dir(launches, monkeypatch, tmp_path):
    monkeypatch.setattr("launcher.run_dir.PROJECT_DIR", tmp_path)
    monkeypatch.setattr("launcher.run_dir.time.strftime", lambda fmt: "20261130-010203")
    assert main([*BASE, "optim.lr=1e-3"]) == 0
    assert main([*BASE, "optim.lr=2e-3"]) == 0
    first, second = (p.parent for p in launches)
    assert first == tmp_path / "runs" / "tiny" / "20261130-010203"
    assert second == tmp_path / "runs" / "tiny" / "20261130-010203-2"
    assert yaml.safe_load((first / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    assert yaml.safe_load((second / "config.yaml").read_text())["optim"]["lr"] == 2e-3


def test_each_launch_keeps_its_resolved_config(launches, tmp_path):
    for lr in ("1e-3", "2e-3", "3e-3"):
        assert main([*BASE, f"run_dir={tmp_path}", f"optim.lr={lr}"]) == 0
    segments = sorted(p.name for p in tmp_path.glob("config*.yaml"))
    assert segments == ["config.segment-1.yaml", "config.segment-2.yaml", "config.segment-3.yaml", "config.yaml"]
    lrs = [yaml.safe_load((tmp_path / f"config.segment-{n}.yaml").read_text())["optim"]["lr"] for n in (1, 2, 3)]
    assert lrs == [1e-3, 2e-3, 3e-3]
    assert (tmp_path / "config.yaml").read_text() == (tmp_path / "config.segment-3.yaml").read_text()


def test_relative_paths_resolve_against_the_project_not_the_cwd(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main([*BASE, "run_dir=runs/relative-example", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out.partition("\n")[2])
    assert cfg["run_dir"] == str(PROJECT_DIR / "runs" / "relative-example")
    assert cfg["data"]["path"] == str((PROJECT_DIR / "data" / "stdlib").resolve())  # data/ may be a symlink


def test_missing_data_says_where_it_looked_and_how_to_build_it(capsys, tmp_path):
    code = main(["train", "data=stdlib", "data.path=no/such/tokens", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(PROJECT_DIR / "no/such/tokens" / "train.bin") in err
    assert "scripts/prepare_data.py" in err and "project directory" in err


def _read_only_place(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked / "run"
    if not Path("/sys").is_dir():  # root writes through file modes; /sys refuses even root
        pytest.skip("no read-only place for root on this machine")
    return Path("/sys/moe-launch-run")


@pytest.mark.parametrize("case", ["regular-file", "under-a-file", "read-only", "name-too-long"])
def test_a_run_dir_that_cannot_be_created_is_one_line(case, capsys, launches, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    run_dir = {
        "regular-file": tmp_path / "file",
        "under-a-file": tmp_path / "file" / "run",
        "read-only": _read_only_place(tmp_path),
        "name-too-long": tmp_path / ("x" * 300),
    }[case]
    code = main([*BASE, f"run_dir={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not launches
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"moe-launch: error: run_dir={run_dir}: cannot create it (")
    assert "allowed: a writable directory path" in err
    if case in ("regular-file", "under-a-file"):
        assert f"({tmp_path / 'file'} is a file, not a directory)" in err
