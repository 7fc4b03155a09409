"""Resume semantics decided before launch: which changed keys are honoured, which refused, and
resume=never/overwrite into a run dir that holds checkpoints. Fake checkpoints, no ranks."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from checkpoint.commit import COMMIT_MARKER, RUN_CONFIG, TRAINER_STATE, file_sizes, step_dir_name
from launcher.cli import main
from launcher.compose import compose_config
from launcher.run_dir import finalize_paths

BASE = ["data=synthetic", "logging.wandb.mode=disabled"]


def fake_checkpoint(run_dir: Path, step: int, overrides: list[str], with_config: bool = True) -> Path:
    """A committed checkpoint dir as the launcher sees it: trainer state, config, COMMITTED."""
    cfg = compose_config("tiny", [*BASE, f"run_dir={run_dir}", *overrides])
    finalize_paths(cfg)
    path = run_dir / "checkpoints" / step_dir_name(step)
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"weights")
    (path / TRAINER_STATE).write_text(json.dumps({"step": step}))
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if with_config:
        (path / RUN_CONFIG).write_text(text)
    else:
        (run_dir / RUN_CONFIG).write_text(text)  # an older checkpoint: only the run's config.yaml
    (path / COMMIT_MARKER).write_text(json.dumps({"files": file_sizes(path)}))
    return path


def dry_run(run_dir: Path, *overrides: str) -> int:
    return main(["train", *BASE, f"run_dir={run_dir}", *overrides, "--dry-run"])


def test_honoured_changes_print_one_line_each(tmp_path, capsys):
    fake_checkpoint(tmp_path, 10, ["optim.lr=1e-3", "train.steps=20"])
    code = dry_run(tmp_path, "optim.lr=3e-4", "train.steps=40", "checkpoint.interval=5", "launcher.nproc_per_node=1")
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines == [
        "moe-launch: resume: optim.lr 0.001 -> 0.0003 (the LR schedule from step 10 follows the new value)",
        "moe-launch: resume: train.steps 20 -> 40 (the LR schedule is stretched to the new length from step 10)",
        "moe-launch: resume: launcher.nproc_per_node 2 -> 1 (the new value is applied)",
        "moe-launch: resume: checkpoint.interval 0 -> 5 (the new value is applied)",
    ]


def test_unchanged_config_prints_nothing(tmp_path, capsys):
    fake_checkpoint(tmp_path, 10, ["train.steps=20"])
    assert dry_run(tmp_path, "train.steps=20") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "change,expected",
    [
        ("model.dim=64", "model.dim=64: the checkpoint"),
        ("model.seq_len=64", "model.seq_len=64"),
        ("model.num_experts=4", "model.num_experts=4"),
        ("data.synthetic_tokens=2000000", "data.synthetic_tokens=2000000"),
        ("train.global_batch_size=32", "train.global_batch_size=32"),
    ],
)
def test_refused_change_exits_2_naming_the_key(tmp_path, capsys, change, expected):
    fake_checkpoint(tmp_path, 10, ["train.steps=20"])
    code = dry_run(tmp_path, "train.steps=20", change)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("moe-launch: error: ")
    assert expected in err and "cannot change on resume" in err
    old = change.split("=")[0]
    assert f"allowed: {old}=" in err  # the value the checkpoint can take


def test_several_refused_changes_are_named_in_one_line(tmp_path, capsys):
    fake_checkpoint(tmp_path, 10, ["train.steps=20"])
    assert dry_run(tmp_path, "train.steps=20", "model.dim=64", "model.n_layers=2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(also changed: model.n_layers)" in err


@pytest.mark.parametrize("steps", [5, 10])
def test_train_steps_at_or_below_the_checkpoint_is_refused(tmp_path, capsys, steps):
    fake_checkpoint(tmp_path, 10, ["train.steps=10"])
    assert dry_run(tmp_path, f"train.steps={steps}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moe-launch: error: train.steps={steps}: ") and "already at step 10" in err
    assert "allowed: train.steps > 10" in err


def test_resume_never_into_a_run_dir_with_checkpoints_is_refused(tmp_path, capsys):
    fake_checkpoint(tmp_path, 10, [])
    assert dry_run(tmp_path, "resume=never") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-launch: error: resume=never: ") and "resume=overwrite" in err


def test_resume_overwrite_deletes_the_previous_run_before_launch(tmp_path, capsys, monkeypatch):
    fake_checkpoint(tmp_path, 10, [])
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n')
    (tmp_path / "config.segment-1.yaml").write_text("old: 1\n")
    launched = {}

    def fake_launch(self, cfg, command, stop=None):  # everything up to starting torchrun is real
        launched["cfg"] = OmegaConf.load(command[-1])
        launched["files"] = sorted(p.name for p in tmp_path.iterdir())
        return 0

    monkeypatch.setattr("launcher.local.LocalLauncher.launch", fake_launch)
    code = main(["train", *BASE, f"run_dir={tmp_path}", "resume=overwrite", "model.dim=64"])
    out = capsys.readouterr().out
    assert code == 0
    assert "resume=overwrite: deleted the previous run's checkpoints, metrics.jsonl, config.segment-1.yaml" in out
    # only the new run's config and its launch record
    assert launched["files"] == ["config.segment-1.yaml", "config.yaml", "launches.jsonl"]
    # The ranks get `auto`: nothing to resume now, and a restart resumes this run, not the old one.
    assert launched["cfg"].resume == "auto" and launched["cfg"].model.dim == 64


def test_older_checkpoint_without_config_compares_with_the_run_config(tmp_path, capsys):
    fake_checkpoint(tmp_path, 10, ["optim.lr=1e-3"], with_config=False)
    assert dry_run(tmp_path, "optim.lr=2e-3") == 0
    assert "optim.lr 0.001 -> 0.002" in capsys.readouterr().err
    assert dry_run(tmp_path, "model.dim=64") == 2
    assert f"({tmp_path / 'config.yaml'})" in capsys.readouterr().err


def test_resume_from_another_runs_checkpoint_into_a_new_run_dir(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "old", 10, ["optim.lr=1e-3"])
    assert dry_run(tmp_path / "new", f"resume={ckpt}", "optim.lr=2e-3") == 0
    assert "optim.lr 0.001 -> 0.002" in capsys.readouterr().err
    assert dry_run(tmp_path / "new", f"resume={ckpt}", "model.dim=64") == 2


def test_only_incomplete_checkpoints_stop_before_launch(tmp_path, capsys):
    path = fake_checkpoint(tmp_path, 10, [])
    (path / COMMIT_MARKER).unlink()
    assert dry_run(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moe-launch: error: resume=auto: no usable checkpoint") and "no COMMITTED marker" in err


def test_the_other_data_sources_key_is_not_compared(tmp_path, capsys):
    fake_checkpoint(tmp_path, 10, ["train.steps=20"])  # synthetic data: data.path is unused
    assert dry_run(tmp_path, "train.steps=20", f"data.path={tmp_path}") == 0
    assert capsys.readouterr().err == ""


def test_an_unreadable_checkpoint_config_is_a_warning(tmp_path, capsys):
    path = fake_checkpoint(tmp_path, 10, ["train.steps=20"])
    (path / "config.yaml").write_text("model: {dim: [\n")
    (path / COMMIT_MARKER).write_text(json.dumps({"files": file_sizes(path)}))  # complete, but unreadable
    assert dry_run(tmp_path, "train.steps=20") == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moe-launch: warning: cannot read {path / 'config.yaml'} (") and len(err.splitlines()) == 1
