"""Runs one rank's action list (parallel/pipeline/actions.py) on its stages: a forward keeps its
input and output for the backward, activations and their gradients travel by isend/irecv on the
pipeline group (one tag per tensor), and the last stage calls the loss. Everything is keyed by
(direction, stage, micro-batch): DualPipe's two model copies each have a last stage.

B runs the whole backward (input and weight gradients) and its W does nothing. With `overlap`,
F&B runs its forward and its backward interleaved at their expert all-to-alls, each one's
all-to-all in flight while the other computes (parallel/pipeline/overlap.py); without, one
after the other. With `timings` set to a list, each compute action's (action, start, end) is
appended to it (time.perf_counter seconds); `a2a_times` holds the last step's all-to-all times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parallel.all_to_all import TIMES, AllToAllTimes
from parallel.pipeline.actions import Action, Kind, PipelineSchedule
from parallel.pipeline.overlap import run_overlapped

# stage, input tokens [B, S], the previous stage's output [B, S, D] (None on the first stage)
StageFn = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor | tuple[torch.Tensor, ...]]
LossFn = Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]

WIRE_DTYPE = torch.float32  # activations and gradients travel in fp32 (exact for bf16 too)


class PipelineRuntime:
    """One rank's executor. `stage_fn(stage, tokens_BS, h_BSD)` runs one of this rank's stages;
    `units[stage]` are the FSDP modules it uses: each reduces its gradients only in the last
    backward on this rank that touches it (a module may serve two stages, the root does)."""

    def __init__(
        self,
        schedule: PipelineSchedule,
        pp_rank: int,
        pp_group: dist.ProcessGroup,
        stage_fn: StageFn,
        loss_fn: LossFn,
        hidden_dim: int,
        units: dict[int, Sequence[nn.Module]],
        overlap: bool = False,
    ):
        self.schedule, self.pp_rank, self.group = schedule, pp_rank, pp_group
        self.stage_fn, self.loss_fn, self.hidden_dim = stage_fn, loss_fn, hidden_dim
        self.actions = schedule.actions[pp_rank]
        self.last_stage = schedule.num_stages - 1
        self.held = set(schedule.stages_of(pp_rank))  # (direction, stage)
        last_held = [d for d, s in self.held if s == self.last_stage]
        self.holds_last_stage = bool(last_held)
        # The share of the step's micro-batches whose loss this rank computes (both halves under DualPipe).
        self.loss_share = sum(len(schedule.microbatches_of(d)) for d in last_held) / schedule.microbatches
        self.global_rank = {r: dist.get_global_rank(pp_group, r) for r in range(schedule.pp)}
        self._sync_plan = self._plan_gradient_sync(units)
        self.overlap, self.units = overlap, units
        self.a2a_times = AllToAllTimes()  # the last step's expert all-to-alls, this rank
        # Set to a list to record (action, start, end) of each compute action (scripts/bench_pipeline.py).
        self.timings: list[tuple[Action, float, float]] | None = None

    def _plan_gradient_sync(self, units: dict[int, Sequence[nn.Module]]) -> list[tuple[nn.Module, int]]:
        """-> (unit, index of the last backward action that touches it) for every unit."""
        last: dict[int, tuple[nn.Module, int]] = {}
        for i, action in enumerate(self.actions):
            for part in action.parts():
                if part.kind in (Kind.B, Kind.BW):
                    for unit in units.get(part.stage, ()):
                        last[id(unit)] = (unit, i)
        return list(last.values())

    def _tag(self, kind: Kind, direction: int, stage: int, microbatch: int) -> int:
        """One tag per tensor: model copy, the boundary it crosses (between stage b and b+1),
        micro-batch, way."""
        boundary = stage if kind in (Kind.SEND_F, Kind.RECV_B) else stage - 1
        backward = kind in (Kind.SEND_B, Kind.RECV_B)
        crossing = direction * self.schedule.num_stages + boundary
        return (crossing * self.schedule.microbatches + microbatch) * 2 + int(backward)

    def step(self, micro_batches: Sequence[torch.Tensor]) -> None:
        """Run this rank's actions over the step's micro-batches ([B, S+1] tokens each, the same
        on every stage); the loss enters the gradients with weight 1/len(micro_batches)."""
        if len(micro_batches) != self.schedule.microbatches:
            raise ValueError(
                f"{len(micro_batches)} micro-batches: the {self.schedule.name} schedule was built for "
                f"{self.schedule.microbatches}"
            )
        self.tokens = [b[:, :-1] for b in micro_batches]
        self.targets = [b[:, 1:] for b in micro_batches]
        self.scale = 1.0 / len(micro_batches)
        # keyed by the chunk (direction, stage, micro-batch)
        self.inputs: dict[tuple[int, int, int], torch.Tensor] = {}  # stage input kept for its gradient
        self.outputs: dict[tuple[int, int, int], torch.Tensor] = {}  # stage output (the loss on the last stage)
        self.received: dict[tuple[Kind, int, int, int], torch.Tensor] = {}
        self.input_grads: dict[tuple[int, int, int], torch.Tensor] = {}
        self.handover: dict[tuple[int, int, int], torch.Tensor] = {}  # output for the next stage, same rank
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        TIMES.reset()
        for index, action in enumerate(self.actions):
            kind, key = action.kind, action.chunk
            if kind in (Kind.RECV_F, Kind.RECV_B):
                start = time.perf_counter() if self.timings is not None else 0.0
                buf = torch.empty(self._shape(action.microbatch), dtype=WIRE_DTYPE, device=self._device())
                dist.irecv(buf, src=self.global_rank[action.peer], group=self.group, tag=self._tag(kind, *key)).wait()
                self.received[(kind, *key)] = buf
                if self.timings is not None:  # receives are timed too: the bench splits waiting from messaging
                    self.timings.append((action, start, time.perf_counter()))
            elif kind in (Kind.SEND_F, Kind.SEND_B):
                if kind is Kind.SEND_F:
                    tensor = self.outputs[key].detach().to(WIRE_DTYPE)
                else:
                    tensor = self.input_grads.pop(key).to(WIRE_DTYPE)
                tag = self._tag(kind, *key)
                sends.append((dist.isend(tensor, dst=self.global_rank[action.peer], group=self.group, tag=tag), tensor))
            else:
                start = time.perf_counter() if self.timings is not None else 0.0
                overlapped = kind is Kind.FB and self.overlap
                if overlapped:
                    self._forward_and_backward(action, index)
                for part in () if overlapped else action.parts():
                    if part.kind is Kind.F:
                        self._forward(*part.chunk)
                    elif part.kind is not Kind.W:  # W: its B ran the whole backward
                        self._backward(*part.chunk, index)
                if self.timings is not None:
                    self.timings.append((action, start, time.perf_counter()))
        for work, _ in sends:
            work.wait()
        self.a2a_times = TIMES.snapshot()
        if self.inputs or self.outputs or self.received or self.input_grads or self.handover:
            raise RuntimeError(f"pipeline rank {self.pp_rank}: the step left unconsumed tensors")

    def _device(self) -> torch.device:
        return self.tokens[0].device

    def _shape(self, microbatch: int) -> tuple[int, int, int]:
        B, S = self.tokens[microbatch].shape
        return (B, S, self.hidden_dim)

    def _stage_input(self, direction: int, stage: int, microbatch: int) -> torch.Tensor | None:
        if stage == 0:
            return None
        if (direction, stage - 1) in self.held:  # the previous stage is on this rank: hand over locally
            h = self.handover.pop((direction, stage - 1, microbatch))
        else:
            h = self.received.pop((Kind.RECV_F, direction, stage, microbatch))
        return h.detach().requires_grad_()

    def _forward(self, direction: int, stage: int, microbatch: int) -> None:
        key = (direction, stage, microbatch)
        h_in = self._stage_input(*key)
        out = self.stage_fn(stage, self.tokens[microbatch], h_in)
        if stage == self.last_stage:
            out = self.loss_fn(out, self.targets[microbatch]) * self.scale
        elif (direction, stage + 1) in self.held:
            self.handover[key] = out
        if h_in is not None:
            self.inputs[key] = h_in
        self.outputs[key] = out

    def _forward_and_backward(self, action: Action, index: int) -> None:
        """F&B overlapped: the forward here, the backward in a helper thread, switching at each
        all-to-all (the same points on every rank of a group, so collectives stay in order)."""
        f, b = action.parts()
        run_overlapped(
            lambda: self._forward(*f.chunk),
            lambda: self._backward(*b.chunk, index),
            self.units.get(f.stage, ()),
            self.units.get(b.stage, ()),
        )

    def _backward(self, direction: int, stage: int, microbatch: int, index: int) -> None:
        key = (direction, stage, microbatch)
        for unit, last_index in self._sync_plan:
            unit.set_requires_gradient_sync(index == last_index, recurse=False)
        out = self.outputs.pop(key)
        if stage == self.last_stage:
            torch.autograd.backward(out)
        else:
            if (direction, stage + 1) in self.held:
                grad = self.input_grads.pop((direction, stage + 1, microbatch))
            else:
                grad = self.received.pop((Kind.RECV_B, *key))
            torch.autograd.backward(out, grad.to(out.dtype))
        h_in = self.inputs.pop(key, None)
        if h_in is not None:
            self.input_grads[key] = h_in.grad if h_in.grad is not None else torch.zeros_like(h_in)

    @torch.no_grad()
    def forward_only(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The model's outputs for `tokens_BS` (evaluation: no loss, no gradients), stage by stage
        in order; -> the last stage's outputs on the rank that holds it, None elsewhere."""
        ranks = self.schedule.stage_ranks[0]
        h, sends = None, []
        shape = (*tokens_BS.shape, self.hidden_dim)
        for stage, rank in enumerate(ranks):
            prev = ranks[stage - 1] if stage > 0 else rank
            if rank != self.pp_rank:
                if prev == self.pp_rank and h is not None:  # hand this rank's output on
                    tensor = h.to(WIRE_DTYPE)
                    sends.append(dist.isend(tensor, dst=self.global_rank[rank], group=self.group, tag=stage))
                h = None
                continue
            if stage > 0 and prev != self.pp_rank:
                h = torch.empty(shape, dtype=WIRE_DTYPE, device=tokens_BS.device)
                dist.recv(h, src=self.global_rank[prev], group=self.group, tag=stage)
            h = self.stage_fn(stage, tokens_BS, h)
        for work in sends:
            work.wait()
        return h if ranks[-1] == self.pp_rank else None
