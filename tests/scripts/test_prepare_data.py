"""scripts/prepare_data.py end to end: the CLI writes train/val files holding the stdlib bytes.
Runs the real script in a subprocess, as a user would."""

import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

from framework.data.token_file import TokenFile

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_data.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_writes_stdlib_bytes(tmp_path):
    out = tmp_path / "stdlib"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--max-bytes", "200000", "--val-fraction", "0.1"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    assert "20000 val tokens" in result.stdout and str(out) in result.stdout

    train, val = TokenFile(out / "train"), TokenFile(out / "val")
    assert (train.num_tokens, val.num_tokens) == (180_000, 20_000)
    assert train.vocab_size == val.vocab_size == 256

    module = _script_module()
    files = module.stdlib_sources(sysconfig.get_paths()["stdlib"])
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    expected, used = b"", 0
    while len(expected) < 200_000:
        expected += files[used].read_bytes()
        used += 1
    expected = expected[:200_000]
    got = bytes(train.window(0, train.num_tokens).astype("u1")) + bytes(val.window(0, val.num_tokens).astype("u1"))
    assert got == expected
    assert result.stdout.startswith(f"{used} files ")
