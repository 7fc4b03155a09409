"""scripts/local_slurm.sh: start and stop are idempotent, and the cluster it stands up runs a 2-node step."""

import subprocess
from pathlib import Path

import pytest

from tests.launcher.slurm_cluster import SCRIPT, slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]
__all__ = ["slurm_cluster"]
PIDS = Path("/run/moe-slurm")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, timeout=120)


def test_start_and_stop_twice_then_a_two_node_step_runs():
    for _ in range(2):
        out = run(str(SCRIPT), "stop")
        assert out.returncode == 0 and "local_slurm: stopped" in out.stderr
        assert not list(PIDS.glob("*.pid"))
    for _ in range(2):
        out = run(str(SCRIPT), "start")
        assert out.returncode == 0, out.stderr
        assert "local_slurm: up: node1 node2 (8 CPUs each) on 127.0.0.1" in out.stderr
    assert sorted(p.name for p in PIDS.glob("*.pid")) == ["slurmctld.pid", "slurmd-node1.pid", "slurmd-node2.pid"]
    out = run("srun", "--nodes=2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME")
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == ["node1", "node2"]
    assert "127.0.0.1 node1 node2" in Path("/etc/hosts").read_text()
