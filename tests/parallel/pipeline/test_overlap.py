"""Overlapped F&B: the baton between the forward and backward sides, and an MoE layer's forward
and another micro-batch's backward interleaved at their all-to-alls (2 gloo ranks)."""

import pytest
import torch

from parallel.pipeline import overlap
from scripts.benchlib import run_ranks
from tests.parallel.harness import expert_parallel_moe


def test_the_sides_alternate_at_each_hand_over_and_finish_alone():
    events = []

    def side(name: str, steps: int):
        def run():
            for i in range(steps):
                events.append(f"{name}{i}")
                overlap.hand_over()  # where a side has just posted an all-to-all

        return run

    trace = []
    overlap.run_overlapped(side("F", 3), side("B", 1), trace=trace)
    # F runs to its first post, B to its first, F on; once B is done, F runs alone.
    assert events == ["F0", "B0", "F1", "F2"]
    assert [(s, e) for _, s, e in trace] == [("F", "start"), ("B", "start"), ("B", "end"), ("F", "end")]
    overlap.hand_over()  # outside an F&B: nothing to hand over to


def test_an_error_in_either_side_reaches_the_caller():
    def fails():
        overlap.hand_over()
        raise ValueError("backward side failed")

    with pytest.raises(ValueError, match="backward side failed"):
        overlap.run_overlapped(lambda: overlap.hand_over(), fails)
    overlap.run_overlapped(lambda: None, lambda: None)  # the failed one left nothing behind


def _moe(world: int):
    moe, _ = expert_parallel_moe(
        world, world, dim=16, num_experts=4, expert_dim=8, top_k=2, num_shared_experts=1, n_groups=1, topk_groups=1
    )
    return moe


def _forward_and_backward(rank: int, world: int) -> dict:
    """Micro-batch 1's forward with micro-batch 2's backward, one after the other and overlapped:
    the same outputs, gradients and loads, and the order of events of the overlapped one."""
    from parallel.all_to_all import TIMES

    moe = _moe(world)
    gen = torch.Generator().manual_seed(10 + rank)
    x1, x2, g2 = (torch.randn(1, 24, 16, generator=gen) for _ in range(3))
    x2.requires_grad_()  # a stage input: the backward sends its gradient through the dispatch too

    def run(overlapped: bool) -> dict:
        moe.zero_grad(set_to_none=True)
        x2.grad = None
        moe.tokens_per_expert.zero_()
        y2 = moe(x2)  # micro-batch 2's forward, earlier in the schedule
        out = {}

        def forward():
            out["y1"] = moe(x1)

        def backward():
            torch.autograd.backward(y2, g2)

        trace = []
        TIMES.reset()
        if overlapped:
            overlap.run_overlapped(forward, backward, trace=trace)
        else:
            forward()
            backward()
        grads = {n: p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for n, p in moe.named_parameters()}
        grads["x2"] = x2.grad
        return {
            "y1": out["y1"].detach(),
            "grads": grads,
            "loads": moe.tokens_per_expert.clone(),
            "trace": [(s, e) for _, s, e in trace],
            "count": TIMES.count,
        }

    return {"apart": run(False), "overlapped": run(True)}


@pytest.mark.slow
def test_an_overlapped_forward_and_backward_interleave_and_equal_the_sequential_ones():
    for rank in run_ranks(_forward_and_backward, 2):
        apart, overlapped = rank["apart"], rank["overlapped"]
        assert torch.equal(overlapped["y1"], apart["y1"])
        assert overlapped["grads"].keys() == apart["grads"].keys()
        for name, grad in apart["grads"].items():
            assert torch.equal(overlapped["grads"][name], grad), name
        assert torch.equal(overlapped["loads"], apart["loads"])
        # forward: counts, dispatch, combine; backward: combine's and dispatch's gradients
        assert overlapped["count"] == apart["count"] == 5
        trace = overlapped["trace"]
        # The forward posts its first all-to-all, the backward side then runs (computing up to its
        # own first post) before the forward waits for it.
        f_post = trace.index(("F", "post"))
        b_start, b_post = trace.index(("B", "start")), trace.index(("B", "post"))
        f_wait = trace.index(("F", "wait"))
        assert f_post < b_start < b_post < f_wait, trace
        assert trace.count(("F", "post")) == 3 and trace.count(("B", "post")) == 2, trace
