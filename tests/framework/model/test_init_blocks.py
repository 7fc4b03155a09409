"""Block-wise init: any run of rows drawn alone equals the same rows of the whole tensor."""

import pytest
import torch

from framework.model import init_blocks
from framework.model.init_blocks import BLOCK_VALUES, block_seed, fill_normal_rows


@pytest.mark.parametrize("shape", [(10, 7), (3, 600, 1000), (5000, 300), (1, 4)])
def test_any_row_range_matches_the_full_draw(shape):
    full = torch.empty(shape)
    fill_normal_rows(full, 0, shape, 0.02, seed=1, name="w")
    rows = shape[0]
    for lo, hi in [(0, rows), (rows // 3, rows // 2 + 1), (rows - 1, rows), (0, 1)]:
        part = torch.empty((hi - lo, *shape[1:]))
        fill_normal_rows(part, lo, shape, 0.02, seed=1, name="w")
        assert torch.equal(part, full[lo:hi]), (lo, hi)


def test_values_depend_on_seed_and_name_only():
    a, b, c, d = (torch.empty(64, 64) for _ in range(4))
    fill_normal_rows(a, 0, (64, 64), 1.0, 0, "x")
    fill_normal_rows(b, 0, (64, 64), 1.0, 0, "x")
    fill_normal_rows(c, 0, (64, 64), 1.0, 1, "x")
    fill_normal_rows(d, 0, (64, 64), 1.0, 0, "y")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert abs(a.std().item() - 1.0) < 0.05


def test_a_shard_draws_only_the_blocks_it_touches(monkeypatch):
    """A rank holding 1 row of a big weight must not draw the whole weight."""
    drawn = []
    monkeypatch.setattr(
        init_blocks, "block_seed", lambda seed, name, block: drawn.append(block) or block_seed(seed, name, block)
    )
    shape = (4096, 1024)  # 4 M values: 4 blocks of 1024 rows
    part = torch.empty(1, 1024)
    fill_normal_rows(part, 2500, shape, 0.02, seed=0, name="embed")
    assert BLOCK_VALUES // 1024 == 1024 and drawn == [2]
