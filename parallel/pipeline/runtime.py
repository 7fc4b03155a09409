"""Runs one rank's action list (parallel/pipeline/actions.py) on its stages: a forward keeps its
input and output for the backward, activations and their gradients travel point to point on the
pipeline group, and the last stage calls the loss. Everything is keyed by
(direction, stage, micro-batch): DualPipe's two model copies each have a last stage.

BW runs a stage's whole backward. B computes only the gradient of the stage's input and W, later,
the weight gradients, without going down the input's chain again (backward_split.py; on the first
stage, which has no input gradient, B computes nothing and W the whole backward). With `overlap`,
F&B runs its forward and its backward (a BW) interleaved at their expert all-to-alls, each one's
all-to-all in flight while the other computes (parallel/pipeline/overlap.py); without, one after
the other. With `timings` set to a list, each compute action's (action, start, end) is appended
to it (time.perf_counter seconds), and each receive's (action, posted, waited from, returned), in
action-list order. The expert all-to-alls' times are read by the trainer
(parallel/all_to_all.py TIMES, around each step).

FSDP2 reduces gradients once per step, after the last B/W/BW: during the step every unit keeps its
gradients (and stays unsharded after a backward, so a W finds its weights as B left them), and
step() ends with each unit's reduce-scatter (parallel/compat.py, as torch's PipelineStage does).

Messages: each run of consecutive SEND/RECV actions is posted as one batch (batch_isend_irecv: one
NCCL group), its receives waited for only when a compute action needs their tensor. The schedule
posts each receive in the batch of its send and, between two ranks, receives tensors in the order
they were sent (schedules.py), so NCCL, which has no tags and matches by order, gets the right
tensor. Each tensor has its own tag all the same (gloo checks them); `one_tag` (or the environment
variable MOE_PP_ONE_TAG=1) sends every message with tag 0, as NCCL sees them: the tests' proof
that the order alone matches them. gloo moves a tensor only once its receive is posted, so on gloo
the receives of the next `recv_lookahead` compute actions (MOE_PP_RECV_LOOKAHEAD, default 1) are
posted before a compute action runs, in list order; on NCCL none are (posted early, a receive
would stand on its pair's stream ahead of sends the schedule put before it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from parallel.compat import defer_fsdp_gradient_reduction, fold_fsdp_gradients, reduce_fsdp_gradients
from parallel.pipeline.actions import Action, Kind, PipelineSchedule
from parallel.pipeline.backward_split import PendingWeightGradients, backward_input, backward_weight
from parallel.pipeline.overlap import run_overlapped
from parallel.pipeline.replay import receives_posted_before

# stage, input tokens [B, S], the previous stage's output [B, S, D] (None on the first stage)
StageFn = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor | tuple[torch.Tensor, ...]]
LossFn = Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]

WIRE_DTYPE = torch.float32  # activations and gradients travel in fp32 (exact for bf16 too)


class PipelineRuntime:
    """One rank's executor. `stage_fn(stage, tokens_BS, h_BSD)` runs one of this rank's stages;
    `units[stage]` are the FSDP modules it uses: each reduces its gradients once, at the end of
    the step (a module may serve two stages, the root does: it is reduced once)."""

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
        one_tag: bool | None = None,
        recv_lookahead: int | None = None,
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
        self.stage_units = units
        self.units = list({id(unit): unit for stage in sorted(units) for unit in units[stage]}.values())
        self.overlap = overlap
        self.one_tag = os.environ.get("MOE_PP_ONE_TAG", "0") == "1" if one_tag is None else one_tag
        if recv_lookahead is None:  # gloo only: posting a receive early reorders an NCCL pair's stream
            gloo = dist.get_backend(pp_group) == "gloo"
            recv_lookahead = int(os.environ.get("MOE_PP_RECV_LOOKAHEAD", "1")) if gloo else 0
        # compute action's index -> receives posted before it (refuses a negative look-ahead)
        self.receives_ahead = receives_posted_before(self.actions, recv_lookahead)
        self.recv_lookahead = recv_lookahead
        # Set to a list to record (action, start, end) of each compute action (scripts/bench_pipeline.py).
        self.timings: list[tuple[Action, float, float] | tuple[Action, float, float, float]] | None = None

    def _tag(self, kind: Kind, direction: int, stage: int, microbatch: int) -> int:
        """One tag per tensor: model copy, the boundary it crosses (between stage b and b+1),
        micro-batch, way; 0 for every tensor with `one_tag`."""
        if self.one_tag:
            return 0
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
        self.pending_weights: dict[tuple[int, int, int], PendingWeightGradients] = {}  # B done, its W not yet
        defer_fsdp_gradient_reduction(self.units)
        self.sends: list[tuple[dist.Work, torch.Tensor]] = []
        self.pending: dict[tuple[Kind, int, int, int], tuple[Action, dist.Work, int, float]] = {}  # posted receives
        batch: list[Action] = []
        for index, action in enumerate([*self.actions, None]):
            if action is not None and not action.is_compute:
                batch.append(action)
                continue
            if batch:
                self._post(batch)
                batch = []
            if action is None:
                break
            self._post_receives_ahead(index)
            self._wait_for_inputs(action)
            start = time.perf_counter() if self.timings is not None else 0.0
            overlapped = action.kind is Kind.FB and self.overlap
            if overlapped:
                self._forward_and_backward(action)
            for part in () if overlapped else action.parts():
                if part.kind is Kind.F:
                    self._forward(*part.chunk)
                elif part.kind is Kind.W:
                    backward_weight(self.pending_weights.pop(part.chunk))
                    fold_fsdp_gradients(self.stage_units.get(part.stage, ()))
                else:
                    self._backward(*part.chunk, split=part.kind is Kind.B)
            if self.timings is not None:
                self.timings.append((action, start, time.perf_counter()))
        for work, _ in self.sends:
            work.wait()
        self.sends = []
        reduce_fsdp_gradients(self.units)  # every B, W and BW of the step is done
        leftover = self.pending or self.received or self.input_grads or self.handover or self.pending_weights
        if self.inputs or self.outputs or leftover:
            raise RuntimeError(f"pipeline rank {self.pp_rank}: the step left unconsumed tensors")

    def _post(self, batch: list[Action]) -> None:
        """Post a run of SEND/RECV actions as one batch; the receives are waited for by
        `_wait_for_inputs`, the sends at the end of the step."""
        ops, posted, ahead = [], time.perf_counter(), []
        for action in batch:
            kind, key, peer = action.kind, action.chunk, self.global_rank[action.peer]
            if (kind, *key) in self.pending:  # posted ahead: its placeholder comes in action-list order
                ahead.append(action)
                continue
            if kind is Kind.SEND_F:
                tensor, op = self.outputs[key].detach().to(WIRE_DTYPE), dist.isend
            elif kind is Kind.SEND_B:
                tensor, op = self.input_grads.pop(key).to(WIRE_DTYPE), dist.isend
            else:
                tensor, op = (
                    torch.empty(self._shape(action.microbatch), dtype=WIRE_DTYPE, device=self._device()),
                    dist.irecv,
                )
                self.received[(kind, *key)] = tensor
            ops.append(dist.P2POp(op, tensor, peer, self.group, self._tag(kind, *key)))
        for action in ahead:
            if self.timings is not None:
                self.timings.append((action, posted, posted))
            recv, work, _, at = self.pending[(action.kind, *action.chunk)]
            self.pending[(action.kind, *action.chunk)] = (recv, work, len(self.timings or ()) - 1, at)
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        if len(works) == 1:  # coalesced (NCCL): one work for the whole group
            works = works * len(ops)
        if len(works) != len(ops):
            raise RuntimeError(f"batch_isend_irecv returned {len(works)} works for {len(ops)} operations")
        posted_ops = [a for a in batch if a not in ahead]
        for action, op, work in zip(posted_ops, ops, works, strict=True):
            if op.op is dist.isend:
                self.sends.append((work, op.tensor))
            else:
                if self.timings is not None:  # a placeholder in action-list order; its wait fills it in
                    self.timings.append((action, posted, posted))
                self.pending[(action.kind, *action.chunk)] = (action, work, len(self.timings or ()) - 1, posted)

    def _post_receives_ahead(self, index: int) -> None:
        """Before the compute action at `index`: post the receives of the action list up to the
        `recv_lookahead`-th compute action after it (each on its own, in list order;
        replay.receives_posted_ahead, the rule the simulator shares), so that gloo, which moves a
        tensor only once its receive is posted, moves it while this rank computes."""
        for position in self.receives_ahead.get(index, ()):
            action = self.actions[position]
            key = (action.kind, *action.chunk)
            buf = torch.empty(self._shape(action.microbatch), dtype=WIRE_DTYPE, device=self._device())
            self.received[key] = buf
            work = dist.irecv(buf, src=self.global_rank[action.peer], group=self.group, tag=self._tag(*key))
            self.pending[key] = (action, work, -1, time.perf_counter())

    def _wait_for_inputs(self, action: Action) -> None:
        """Wait for the received tensors `action` computes on (a receive is timed from its posting)."""
        for part in action.parts():
            kind = Kind.RECV_F if part.kind is Kind.F else Kind.RECV_B if part.kind in (Kind.B, Kind.BW) else None
            if kind is None or (kind, *part.chunk) not in self.pending:
                continue
            recv, work, index, posted = self.pending.pop((kind, *part.chunk))
            waited_from = time.perf_counter()
            work.wait()
            if self.timings is not None:  # the bench splits waiting from messaging
                self.timings[index] = (recv, posted, waited_from, time.perf_counter())

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

    def _forward_and_backward(self, action: Action) -> None:
        """F&B overlapped: the forward here, the backward (a BW) in a helper thread, switching at
        each all-to-all (the same points on every rank of a group, so collectives stay in order)."""
        f, b = action.parts()
        run_overlapped(
            lambda: self._forward(*f.chunk),
            lambda: self._backward(*b.chunk, split=b.kind is Kind.B),
            self.stage_units.get(f.stage, ()),
            self.stage_units.get(b.stage, ()),
        )

    def _backward(self, direction: int, stage: int, microbatch: int, split: bool) -> None:
        """BW (split=False): the whole backward. B (split=True): the input gradient only; its W
        (backward_weight) runs later from what B leaves in `pending_weights`."""
        key = (direction, stage, microbatch)
        out = self.outputs.pop(key)
        grad = None  # the last stage's output is the loss
        if stage != self.last_stage:
            if (direction, stage + 1) in self.held:
                grad = self.input_grads.pop((direction, stage + 1, microbatch))
            else:
                grad = self.received.pop((Kind.RECV_B, *key))
            grad = grad.to(out.dtype)
        h_in = self.inputs.pop(key, None)
        if split:
            h_grad, self.pending_weights[key] = backward_input(out, grad, h_in)
        else:
            torch.autograd.backward(out, grad)
            h_grad = None if h_in is None else h_in.grad if h_in.grad is not None else torch.zeros_like(h_in)
        if h_in is not None:
            self.input_grads[key] = h_grad

    @torch.no_grad()
    def forward_only(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The model's outputs for `tokens_BS` (evaluation: no loss, no gradients), stage by stage
        in order; -> the last stage's outputs on the rank that holds it, None elsewhere.

        Messages follow the step's rules: each is a batch_isend_irecv (on NCCL the group's own
        communicator, as the step's batches; a lone isend/recv would open one per pair of ranks)
        with the step's tag for the boundary it crosses (0 with `one_tag`). One operation per batch
        is enough: the chain runs in one direction, one micro-batch, so between two ranks tensors
        are received in the order they were sent, and each rank posts its send before it waits for
        its next receive, so no rank waits on one that waits on it."""
        ranks = self.schedule.stage_ranks[0]
        h, sends = None, []
        shape = (*tokens_BS.shape, self.hidden_dim)
        for stage, rank in enumerate(ranks):
            prev = ranks[stage - 1] if stage > 0 else rank
            if rank != self.pp_rank:
                if prev == self.pp_rank and h is not None:  # hand this rank's output on
                    tensor = h.to(WIRE_DTYPE)
                    tag = self._tag(Kind.SEND_F, 0, stage - 1, 0)
                    sends += [(work, tensor) for work in self._post_one(dist.isend, tensor, rank, tag)]
                h = None
                continue
            if stage > 0 and prev != self.pp_rank:
                h = torch.empty(shape, dtype=WIRE_DTYPE, device=tokens_BS.device)
                for work in self._post_one(dist.irecv, h, prev, self._tag(Kind.RECV_F, 0, stage, 0)):
                    work.wait()
            h = self.stage_fn(stage, tokens_BS, h)
        for work, _ in sends:  # each tensor kept until its send is done
            work.wait()
        return h if ranks[-1] == self.pp_rank else None

    def _post_one(self, op: Callable, tensor: torch.Tensor, pp_peer: int, tag: int) -> list[dist.Work]:
        """One point-to-point operation with pipeline rank `pp_peer`, posted as a batch of one."""
        return dist.batch_isend_irecv([dist.P2POp(op, tensor, self.global_rank[pp_peer], self.group, tag)])
