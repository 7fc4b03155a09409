"""The benchmark scripts still run (tiny sizes) and print the tables and checks they promise:
numbers come from them, so they must not rot."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SEPARATOR = re.compile(r"^\|(:?-{3,}:?\|)+$")


def _quick(script: str) -> str:
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _tables(stdout: str) -> list[list[list[str]]]:
    """Every markdown table: runs of lines starting with '|' -> rows of cells, separator dropped.
    Each table must have a header, a separator with one entry per column, and rows as wide."""
    blocks, current = [], []
    for line in stdout.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    tables = []
    for block in blocks:
        assert len(block) >= 3 and SEPARATOR.match(block[1]), block
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block]
        width = len(rows[0])
        assert block[1].count("|") - 1 == width, block
        assert all(len(row) == width for row in rows), block
        tables.append([rows[0], *rows[2:]])
    return tables


def _numbers_after(stdout: str, label: str) -> list[float]:
    return [float(x) for x in re.findall(re.escape(label) + r"\s*=?\s*([-+0-9.e]+)", stdout)]


def test_bench_moe_layer_tables_and_correctness():
    stdout = _quick("bench_moe_layer.py")
    layer, gemms = _tables(stdout)
    assert layer[0][:2] == ["variant", "fwd+bwd ms (median)"]
    variants = [row[0] for row in layer[1:]]
    assert variants[:3] == [
        "ours (grouped GEMM, dropless)",
        "ours, experts via looped_mm",
        "naive (loop over experts, index_add_)",
    ]
    assert layer[1][-1] == "1.00x"  # ours against itself
    assert gemms[0][0].startswith("expert GEMMs, fwd+bwd") and len(gemms) == 1 + 4
    # The variants compute the same layer: same routing and weights, float error only.
    errors = _numbers_after(stdout, "max |naive - ours|") + _numbers_after(stdout, "max |looped_mm - grouped_mm|")
    assert len(errors) == 2 and max(errors) < 1e-4
    assert "- goal 1, ours >= 2x DeepSpeed tokens/s:" in stdout
    assert "- goal 2, expert GEMMs >= 80% of dense-matmul GFLOP/s:" in stdout


def test_bench_ep_table_and_ep_matches_the_full_layer():
    stdout = _quick("bench_ep.py")
    (table,) = _tables(stdout)
    assert table[0][:3] == ["EP", "ranks", "tokens/s (global)"]
    assert [row[0] for row in table[1:]] == ["1", "2", "4"]
    assert table[1][3] == "1.00x"
    errors = _numbers_after(stdout, "max |EP out - full-layer out|")
    assert len(errors) == 3 and max(errors) < 1e-5


def test_bench_checkpoint_tables_and_goals():
    stdout = _quick("bench_checkpoint.py")  # a load that does not reproduce the saved state fails the run
    sync, async_ = _tables(stdout)
    assert sync[0][:3] == ["processes", "state MB", "plain write s"]
    assert async_[0][:2] == ["processes", "first save blocks s"]
    assert [row[0] for row in sync[1:]] == [row[0] for row in async_[1:]] == ["1", "2"]
    assert stdout.count("- goal: ") == 2


def test_bench_pipeline_table_per_schedule_and_pp():
    stdout = _quick("bench_pipeline.py")
    assert "pp=4: 4 processes on" in stdout or "oversubscribed" not in stdout
    steps, kinds = _tables(stdout)
    assert steps[0][:3] == ["schedule", "pp", "step ms"]
    schedules = ["gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipev"]
    assert [(row[0], row[1]) for row in steps[1:]] == [(s, pp) for pp in ("2", "4") for s in schedules]
    for row in steps[1:]:
        per_rank = [float(x) for x in row[3].split(" / ")]
        assert len(per_rank) == int(row[1]) and all(0 <= b < 100 for b in per_rank)
        assert float(row[2]) > 0 and float(row[5]) > 0 and float(row[8]) > 0
    assert [row[0] for row in kinds[1:]] == [s for _ in ("2", "4") for s in schedules]


def test_bench_backward_split_table_per_stage():
    (table,) = _tables(_quick("bench_backward_split.py"))
    assert table[0][:3] == ["checkpointing", "stage", "BW ms"]
    assert [(row[0], row[1]) for row in table[1:]] == [(ac, s) for ac in ("none", "full") for s in ("0", "1")]
    for row in table[1:]:
        bw, b, w = (float(x) for x in row[2:5])
        assert bw > 0 and w > 0 and b > 0
        if row[1] == "0":  # the first stage has no input gradient: its B only does the bookkeeping
            assert b < 0.1 * w
