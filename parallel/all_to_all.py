"""The expert all-to-all: posted asynchronously, forward and backward, and inside an overlapped F&B
(parallel/pipeline/overlap.py) the other side runs until it is waited for. Owns its timing.

One op, `moe_launch::all_to_all` (a new buffer, filled by the collective), carries every exchange,
so selective activation checkpointing keeps its output by name (parallel/activation_checkpoint.py
_SAVED_OPS) and its rerun sends nothing: the op then returns the kept buffer and no work is waited
for. `TIMES` adds up, per process, each exchange's time in flight (post to completion) and the
time spent blocked waiting for it (exposed): their difference is what the overlap hid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.pipeline import overlap


@dataclass
class AllToAllTimes:
    """Seconds summed over this process's all-to-alls since reset() (host clock: on CUDA the
    collectives run on their stream and these measure the host only)."""

    count: int = 0
    total_s: float = 0.0  # post to completion
    exposed_s: float = 0.0  # blocked in the wait
    hidden_s: float = 0.0  # in flight while this rank ran something else (the other side)

    def reset(self) -> None:
        self.count, self.total_s, self.exposed_s, self.hidden_s = 0, 0.0, 0.0, 0.0

    def snapshot(self) -> AllToAllTimes:
        return AllToAllTimes(self.count, self.total_s, self.exposed_s, self.hidden_s)


TIMES = AllToAllTimes()

_GROUPS: dict[str, dist.ProcessGroup] = {}  # the op takes a group by name


class _Posted:
    """A posted exchange; its completion time is taken by the backend's thread (gloo) as it ends."""

    def __init__(self, work: dist.Work):
        self.work, self.start, self.done = work, time.perf_counter(), 0.0
        self.marked = work.get_future().then(self._mark)

    def _mark(self, _future) -> None:
        self.done = time.perf_counter()

    def wait(self) -> None:
        overlap.note("wait")
        begin = time.perf_counter()
        self.work.wait()
        self.marked.wait()
        end = time.perf_counter()
        done = self.done or end
        TIMES.count += 1
        TIMES.exposed_s += end - begin
        TIMES.total_s += done - self.start
        TIMES.hidden_s += max(0.0, min(done, begin) - self.start)


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
