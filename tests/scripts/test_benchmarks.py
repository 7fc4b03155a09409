"""The benchmark scripts still run (tiny sizes): numbers come from them, so they must not rot."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.parametrize("script", ["bench_moe_layer.py", "bench_ep.py", "bench_checkpoint.py"])
def test_benchmark_quick_run_prints_a_table(script):
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "|---" in out.stdout or "| ---" in out.stdout or "|--" in out.stdout
