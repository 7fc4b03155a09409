"""SequenceSampler: the global data order is the same for every dp layout and across resumes.
Shares concatenated over ranks must equal the single-rank batch, step for step."""

import pytest

from framework.data.sampler import SequenceSampler


def _global_steps(dp_size, steps, num_tokens=1000, seq_len=16, gbs=8, seed=7, state=None):
    """Per step: the concatenation of every rank's share, in rank order."""
    samplers = [SequenceSampler(num_tokens, seq_len, gbs, r, dp_size, seed) for r in range(dp_size)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(state)
    out = [[x for s in samplers for x in s.next_step_starts()] for _ in range(steps)]
    return out, samplers[0].state_dict()


def test_chunks_fit_and_are_aligned():
    s = SequenceSampler(num_tokens=161, seq_len=16, global_batch_size=10, dp_rank=0, dp_size=1, seed=0)
    assert s.num_chunks == 10
    starts = s.next_step_starts()
    assert sorted(starts) == [i * 16 for i in range(10)]
    assert max(starts) + 17 <= 161


def test_union_of_shares_is_layout_free():
    reference, _ = _global_steps(1, steps=20)
    for dp in (2, 4):
        got, _ = _global_steps(dp, steps=20)
        assert got == reference


def test_each_rank_gets_its_contiguous_slice():
    (step,), _ = _global_steps(1, steps=1)
    s = SequenceSampler(1000, 16, 8, dp_rank=2, dp_size=4, seed=7)
    assert s.next_step_starts() == step[4:6]


def test_resume_with_different_dp_size_continues_identically():
    full, _ = _global_steps(1, steps=12)
    first, state = _global_steps(2, steps=5)
    assert state["consumed_samples"] == 40
    rest, _ = _global_steps(4, steps=7, state=state)
    assert first + rest == full


def test_epoch_wrap_covers_every_chunk_then_reshuffles():
    # 9 chunks, 3 samples per step: steps 0-2 are epoch 0, steps 3-5 epoch 1.
    steps, _ = _global_steps(1, steps=6, num_tokens=9 * 4 + 1, seq_len=4, gbs=3)
    epoch0 = [x for step in steps[:3] for x in step]
    epoch1 = [x for step in steps[3:] for x in step]
    assert sorted(epoch0) == sorted(epoch1) == [4 * i for i in range(9)]
    assert epoch0 != epoch1


def test_step_straddling_an_epoch_boundary():
    # 5 chunks, 4 per step: step 1 takes one chunk of epoch 0 and three of epoch 1.
    steps, _ = _global_steps(1, steps=5, num_tokens=5 * 4 + 1, seq_len=4, gbs=4)
    flat = [x for step in steps for x in step]
    for epoch in range(4):
        assert sorted(flat[5 * epoch : 5 * epoch + 5]) == [0, 4, 8, 12, 16]
    assert _global_steps(2, steps=5, num_tokens=21, seq_len=4, gbs=4)[0] == steps


def test_seed_changes_order():
    a, _ = _global_steps(1, steps=3, seed=1)
    b, _ = _global_steps(1, steps=3, seed=2)
    assert a != b


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="global_batch_size=6.*dp_size=4"):
        SequenceSampler(1000, 16, 6, 0, 4, 0)
    with pytest.raises(ValueError, match="16 tokens, too few for seq_len=16"):
        SequenceSampler(16, 16, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="dp_rank=2"):
        SequenceSampler(1000, 16, 4, 2, 2, 0)


def test_load_rejects_different_chunking():
    state = SequenceSampler(1000, 16, 8, 0, 1, 0).state_dict()
    with pytest.raises(ValueError, match="seq_len=16.*seq_len=32"):
        SequenceSampler(1000, 32, 8, 0, 1, 0).load_state_dict(state)
