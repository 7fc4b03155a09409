"""BatchLoader and validation_batches: tensor shapes, contents and layout-free splitting.
The windows all ranks read together must equal what one process reads alone."""

import numpy as np
import pytest
import torch

from framework.data.loader import BatchLoader, validation_batches
from framework.data.sampler import SequenceSampler
from framework.data.token_file import InMemoryTokens


def _source(n=1000):
    return InMemoryTokens(np.arange(n) % 97, vocab_size=97)


def test_next_step_shapes_and_contents():
    src = _source()
    sampler = SequenceSampler(src.num_tokens, 16, global_batch_size=8, dp_rank=1, dp_size=2, seed=0)
    expected = SequenceSampler(src.num_tokens, 16, 8, 1, 2, 0).next_step_starts()
    micro = BatchLoader(src, sampler, micro_batch_size=2).next_step()
    assert len(micro) == 2
    for mb in micro:
        assert mb.shape == (2, 17) and mb.dtype == torch.int64
    rows = torch.cat(micro)
    for row, start in zip(rows, expected, strict=True):
        assert row.tolist() == src.window(start, 17).tolist()


def test_micro_batch_must_divide_per_rank_share():
    src = _source()
    sampler = SequenceSampler(src.num_tokens, 16, 8, 0, 2, 0)
    with pytest.raises(ValueError, match="micro_batch_size=3.*per-rank batch 4"):
        BatchLoader(src, sampler, micro_batch_size=3)


def test_sampler_and_source_must_agree():
    with pytest.raises(ValueError, match="500 tokens.*1000"):
        BatchLoader(_source(1000), SequenceSampler(500, 16, 4, 0, 1, 0), 1)


def _real_rows(batches):
    return torch.cat([b.tokens_BS1[: b.valid_rows] for b in batches])


def test_validation_is_fixed_and_evenly_spaced():
    src = _source()
    batches = validation_batches(src, seq_len=16, num_batches=3, batch_size=4, dp_rank=0, dp_size=1)
    assert [(b.tokens_BS1.shape, b.valid_rows) for b in batches] == [((4, 17), 4)] * 3
    assert all(b.tokens_BS1.dtype == torch.int64 for b in batches)
    rows = _real_rows(batches)
    assert int(rows[0, 0]) == 0 and rows[-1].tolist() == src.window(1000 - 17, 17).tolist()
    again = validation_batches(src, 16, 3, 4, 0, 1)
    assert all(torch.equal(a.tokens_BS1, b.tokens_BS1) for a, b in zip(batches, again, strict=True))


@pytest.mark.parametrize("dp_size", [2, 3, 4, 5, 16])
def test_validation_split_across_ranks_covers_same_windows(dp_size):
    src = _source()
    single = _real_rows(validation_batches(src, 16, 3, 4, 0, 1))
    shares = [validation_batches(src, 16, 3, 4, r, dp_size) for r in range(dp_size)]
    assert all(b.tokens_BS1.shape == (4, 17) for share in shares for b in share)
    assert torch.equal(torch.cat([_real_rows(share) for share in shares]), single)


@pytest.mark.parametrize(("num_batches", "batch_size", "dp_size"), [(5, 2, 4), (3, 4, 16), (1, 1, 3), (7, 3, 2)])
def test_every_rank_runs_the_same_number_of_forwards(num_batches, batch_size, dp_size):
    """eval_batches=5, micro_batch_size=2 on 4 ranks used to give 1, 2, 1, 2 forwards: the
    FSDP/EP collectives inside them did not line up."""
    src = _source()
    counts = {len(validation_batches(src, 16, num_batches, batch_size, r, dp_size)) for r in range(dp_size)}
    assert len(counts) == 1
    total = sum(
        b.valid_rows for r in range(dp_size) for b in validation_batches(src, 16, num_batches, batch_size, r, dp_size)
    )
    assert total == num_batches * batch_size


def test_validation_too_short_raises():
    with pytest.raises(ValueError, match="10 tokens, too few for seq_len=16"):
        validation_batches(_source(10), 16, 1, 1, 0, 1)
