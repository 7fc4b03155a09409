"""One line and exit code 2, before any process starts, for each class of user error that used
to end in a traceback: the message names the file or key and what is allowed."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from framework.data.token_file import write_token_file
from launcher.cli import main

TRAIN = ["train", "logging.wandb.mode=disabled"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moe-launch: error: ") and "Traceback" not in err
    return err


def test_yaml_syntax_error_names_the_users_file_and_line(capsys, tmp_path):
    exp = tmp_path / "broken.yaml"
    exp.write_text("train:\n  steps: 7\nmodel: {dim: 64\n  n_layers: 2\n")  # the flow mapping never closes
    code = main([*TRAIN, f"config={exp}", "data=synthetic", "--dry-run"])
    err = one_error_line(capsys)
    assert code == 2
    assert err.startswith(f"moe-launch: error: config={exp}: line 4, column 11: YAML syntax error")
    assert "moe-launch-" not in err  # not the staged temporary copy


def _tokens(root: Path, split: str, ids: np.ndarray, sidecar: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.bin").write_bytes(ids.astype("<u2").tobytes())
    meta = {"format": "moe-launch-tokens-v1", "dtype": "uint16", "num_tokens": int(ids.size), "vocab_size": 256}
    (root / f"{split}.json").write_text(json.dumps({**meta, **sidecar}))


@pytest.mark.parametrize(
    "case,expected",
    [
        ("empty", "has num_tokens 0; allowed: an integer >= 1"),
        ("truncated", "the file is truncated"),
        ("too-short", "holds 20 tokens, too few for model.seq_len=128 (one sample needs 129)"),
        ("id-too-large", "holds token id 300, outside the allowed [0, 256)"),
    ],
)
def test_bad_token_files_are_found_before_launch(case, expected, capsys, tmp_path):
    data = tmp_path / "tokens"
    write_token_file(data / "train", np.arange(1000) % 256, 256)
    good_val = np.arange(1000) % 256
    if case == "empty":
        _tokens(data, "val", np.array([], dtype=np.int64), {})
    elif case == "truncated":
        _tokens(data, "val", good_val, {"num_tokens": 2000})
    elif case == "too-short":
        _tokens(data, "val", good_val[:20], {})
    else:
        _tokens(data, "val", np.concatenate([good_val, [300]]), {})
    code = main([*TRAIN, "data=stdlib", f"data.path={data}", f"run_dir={tmp_path / 'run'}"])
    err = one_error_line(capsys)
    assert code == 2 and err.startswith(f"moe-launch: error: data.path={data}: ")
    assert expected in err and str(data / "val") in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    return tmp_path


def test_wandb_online_without_an_api_key(no_wandb_key, capsys):
    code = main(["train", "data=synthetic", "logging.wandb.mode=online", "--dry-run"])
    err = one_error_line(capsys)
    assert code == 2
    assert err.startswith("moe-launch: error: logging.wandb.mode=online: no W&B API key found (WANDB_API_KEY")
    assert "allowed without a key: offline, disabled" in err


@pytest.mark.parametrize("how", ["env", "netrc"])
def test_wandb_online_with_an_api_key_passes(how, no_wandb_key, monkeypatch, capsys):
    if how == "env":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    else:
        netrc = no_wandb_key / ".netrc"
        netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'x' * 40}\n")
        netrc.chmod(0o600)
    assert main(["train", "data=synthetic", "logging.wandb.mode=online", "--dry-run"]) == 0


@pytest.mark.parametrize("target", ["empty-dir", "missing", "run-dir"])
def test_resume_from_something_that_is_not_a_checkpoint(target, capsys, tmp_path):
    path = {"empty-dir": tmp_path, "missing": tmp_path / "nope", "run-dir": tmp_path}[target]
    if target == "run-dir":
        (tmp_path / "checkpoints").mkdir()
    code = main([*TRAIN, "data=synthetic", f"resume={path}", "--dry-run"])
    err = one_error_line(capsys)
    assert code == 2 and err.startswith(f"moe-launch: error: resume={path}: not a checkpoint (")
    assert "allowed: auto, never, overwrite, or the path of a committed checkpoint directory" in err


@pytest.mark.parametrize("name", ["outdir", "weights.safetensors"])
def test_export_to_a_directory_is_one_line_and_leaves_nothing(name, capsys, tmp_path):
    out = tmp_path / name
    out.mkdir()
    code = main(["export", str(tmp_path / "run"), "--out", str(out)])
    err = one_error_line(capsys)
    assert code == 2 and err == (
        f"moe-launch: error: --out {out}: is a directory; allowed: a file path ending in .safetensors or .pt"
    )
    assert sorted(os.listdir(tmp_path)) == [name] and not list(out.iterdir())
