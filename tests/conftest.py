"""One intra-op thread for torch in the pytest process: its tensors are tiny, and on a busy
2-core machine two spinning OpenMP threads made a 30-step toy fit take 10-30 s instead of 1."""

import sys

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Only where torch is already imported: the launcher's tests stay torch-free."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
