"""The expert all-to-all: posted asynchronously, forward and backward, and inside an overlapped F&B
(parallel/pipeline/overlap.py) the other side runs until it is waited for. Owns its timing.

One op, `moe_launch::all_to_all` (a new buffer, filled by the collective), carries every exchange,
so selective activation checkpointing keeps its output by name (parallel/activation_checkpoint.py
_SAVED_OPS) and its rerun sends nothing: the op then returns the kept buffer and no work is waited
for. `TIMES` adds up, per process, the time spent blocked waiting for exchanges (exposed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.pipeline import overlap


@dataclass
class AllToAllTimes:
    """This process's all-to-alls since reset(), host clock (on CUDA the collectives run on their
    stream and these measure the host only). No completion callback is used: one would need the
    GIL from the backend's thread while the other side computes, and delay both."""

    count: int = 0
    exposed_s: float = 0.0  # blocked in the wait (for the data, or a slow peer to post)
    in_flight_s: float = 0.0  # post to the end of its wait (the other side's compute in between)
    ready: int = 0  # already complete when their wait began: fully hidden
    in_overlap: int = 0  # waited for inside an overlapped F&B (the other side ran while in flight)

    def reset(self) -> None:
        self.count, self.exposed_s, self.in_flight_s, self.ready, self.in_overlap = 0, 0.0, 0.0, 0, 0

    def snapshot(self) -> AllToAllTimes:
        return AllToAllTimes(self.count, self.exposed_s, self.in_flight_s, self.ready, self.in_overlap)


TIMES = AllToAllTimes()

_GROUPS: dict[str, dist.ProcessGroup] = {}  # the op takes a group by name


class _Posted:
    """A posted exchange."""

    def __init__(self, work: dist.Work):
        self.work, self.start = work, time.perf_counter()

    def wait(self) -> None:
        overlap.note("wait")
        ready = self.work.is_completed()
        begin = time.perf_counter()
        self.work.wait()
        end = time.perf_counter()
        TIMES.count += 1
        TIMES.ready += int(ready)
        TIMES.in_overlap += int(overlap.running())
        TIMES.exposed_s += end - begin
        TIMES.in_flight_s += end - self.start


_posted: _Posted | None = None  # set by the op, taken by its caller before anything else runs


@torch.library.custom_op("moe_launch::all_to_all", mutates_args=())
def _all_to_all_op(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: str) -> torch.Tensor:
    global _posted
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_splits, input_splits, group=_GROUPS[group], async_op=True)
    _posted = _Posted(work)
    overlap.note("post")
    return out


@torch._dynamo.disable
def exchange(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """all_to_all_single of `x` (rows split by `input_splits`), without autograd: post it, let
    the other side of an overlapped F&B run, then wait for it."""
    global _posted
    _GROUPS.setdefault(group.group_name, group)
    _posted = None
    out = torch.ops.moe_launch.all_to_all(x.contiguous(), list(output_splits), list(input_splits), group.group_name)
    posted, _posted = _posted, None
    if posted is not None:  # None: selective checkpointing's rerun returned the kept output
        overlap.hand_over()
        posted.wait()
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        return exchange(grad_out, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


@torch._dynamo.disable  # a compiled block breaks its graph here: the exchange runs eagerly
def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Differentiable variable-size all-to-all of `x`'s rows; its backward sends the gradient back
    the same way (and hands over the same way inside an overlapped F&B)."""
    return _AllToAll.apply(x, output_splits, input_splits, group)
