"""One intra-op thread for torch, in the pytest process and in every process a test starts: the
tensors are tiny, and on a busy 2-core machine two spinning OpenMP threads per process made a
30-step toy fit take 10-30 s instead of 1, and a 2-step `moe-launch train` on one rank 81 s
instead of 14. torchrun already sets OMP_NUM_THREADS=1 for 2+ ranks per node; this covers one
rank per node (sweeps, SLURM jobs), plain subprocesses and the ranks of scripts.benchlib."""

import os
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; a user's setting stays


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Only where torch is already imported: the launcher's tests stay torch-free."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
