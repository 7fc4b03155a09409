"""Times a schedule without a model: given how long F, B, W, BW and F&B take (and what a message
costs), each rank's timeline, the step time and each rank's bubble (idle time within the step)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from parallel.pipeline.actions import Action, Kind, PipelineSchedule
from parallel.pipeline.replay import message, play, receives_posted_before
from parallel.pipeline.validate import ScheduleError


@dataclass(frozen=True)
class Durations:
    """Time per action on one stage and one micro-batch, in any unit.

    f: forward; b: input-gradient backward; w: weight-gradient backward (a full backward BW
    takes b + w); fb: one F&B, a forward overlapped with a full backward (None: f + b + w,
    i.e. no gain from the overlap). A message's costs: comm, its latency from the send's
    posting to its arrival at a receiver that waits for it (the sender does not wait for it);
    send, the time posting it occupies the sender (gloo writes the tensor into the socket in the
    sender's thread when the receive is already posted); recv, the least time a receive takes
    even when its message was sent long before (a rendezvous: gloo moves a tensor only once its
    receive is posted, a round trip through the sender's communication thread).
    """

    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0
    send: float = 0.0
    recv: float = 0.0

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "fb", "comm", "send", "recv"):
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value):
                raise ValueError(f"{name}={value}: durations must be finite numbers")
            if value < 0:
                raise ValueError(f"{name}={value}: durations must be >= 0")

    def of(self, action: Action) -> float:
        if action.kind is Kind.F:
            return self.f
        if action.kind is Kind.B:
            return self.b
        if action.kind is Kind.W:
            return self.w
        if action.kind is Kind.BW:
            return self.b + self.w
        if action.kind is Kind.FB:
            return self.f + self.b + self.w if self.fb is None else self.fb
        return 0.0


@dataclass(frozen=True)
class Span:
    start: float
    end: float
    action: Action
    waited_from: float | None = None  # a receive: when its rank began waiting for it


@dataclass(frozen=True)
class Timeline:
    """The simulated step: compute spans per rank (in order), step time, idle time per rank;
    `receives`: each receive's span per rank, from its posting to its return (when the compute
    action that needs its tensor had it), in action-list order; `recv_lookahead`: how many
    compute actions ahead receives were posted; `ends`: when each rank's step ended (its last
    action, the sends after it, its `finish`)."""

    schedule: PipelineSchedule
    durations: Durations
    spans: dict[int, list[Span]]
    step_time: float
    receives: dict[int, list[Span]] = field(default_factory=dict)
    recv_lookahead: int = 0
    ends: dict[int, float] = field(default_factory=dict)

    def busy(self, rank: int) -> float:
        return sum(s.end - s.start for s in self.spans[rank])

    def bubble(self, rank: int) -> float:
        """Idle time of `rank` within the step (the step ends when the last rank finishes)."""
        return self.step_time - self.busy(rank)

    @property
    def bubbles(self) -> dict[int, float]:
        return {r: self.bubble(r) for r in self.spans}

    @property
    def bubble_share(self) -> float:
        """Idle share of all ranks' time in the step."""
        total = self.step_time * len(self.spans)
        return sum(self.bubbles.values()) / total if total else 0.0


def simulate(
    schedule: PipelineSchedule,
    durations: Durations | None = None,
    time_of: Callable[[int, Action], float] | None = None,
    recv_lookahead: int = 0,
    finish: Mapping[int, float] | None = None,
) -> Timeline:
    """Run the schedule on a clock: a rank starts each compute action as soon as its previous
    one ended and the receives of its tensors returned (a receive is posted at its place in the
    list and waited for by the compute action that needs it, as the runtime does). Posting a
    send takes the rank `durations.send`, and its message lands `durations.comm` after the
    posting began. A receive returns at the later of its message's landing and its own posting
    plus `durations.recv`. With `recv_lookahead` > 0 a receive is posted that many compute
    actions early, as the runtime does on gloo (replay.receives_posted_ahead): just before the
    compute action that posts it starts, so its `recv` runs while the rank computes and only
    what is left of it when the tensor is needed delays the rank. `finish[rank]`: the time the
    rank's step goes on after its last action (the runtime waits for its sends and reduces the
    gradients there), outside every action, so idle like the fill and drain. `time_of(rank, action)`, when
    given, overrides the uniform times of compute actions (e.g. measured per rank and stage, or
    scaled by the stage cut's costs)."""
    for rank, after in (finish or {}).items():
        if after < 0:
            raise ValueError(f"finish[{rank}]={after}: must be >= 0")
    durations = durations or Durations()
    time_of = time_of or (lambda rank, action: durations.of(action))
    ops = schedule.actions
    clock = {r: 0.0 for r in ops}
    arrival: dict[tuple, float] = {}
    spans: dict[int, list[Span]] = {r: [] for r in ops}
    receives: dict[int, list[Span]] = {r: [] for r in ops}
    posted: dict[tuple, tuple[float, Action, int]] = {}  # (rank, kind, chunk) -> receive not yet waited for
    ahead = {r: receives_posted_before(ops[r], recv_lookahead) for r in ops}  # compute index -> receives it posts
    posted_ahead: dict[tuple[int, int], float] = {}  # (rank, index of a RECV) -> when it was posted

    def advance(rank: int, pos: Mapping[int, int]) -> int:
        action = ops[rank][pos[rank]]
        if action.kind in (Kind.SEND_F, Kind.SEND_B):
            arrival[message(rank, action)] = clock[rank] + durations.comm
            clock[rank] += durations.send
        elif action.kind in (Kind.RECV_F, Kind.RECV_B):
            start = posted_ahead.pop((rank, pos[rank]), clock[rank])
            posted[(rank, action.kind, action.chunk)] = (start, action, len(receives[rank]))
            receives[rank].append(Span(start, start, action))  # its wait fills it in
        else:
            waits = [
                (rank, Kind.RECV_F if part.kind is Kind.F else Kind.RECV_B, part.chunk)
                for part in action.parts()
                if part.kind is not Kind.W
            ]
            waits = [w for w in waits if w in posted]
            if any(message(rank, posted[w][1]) not in arrival for w in waits):
                return 0
            for index in ahead[rank].get(pos[rank], ()):  # posted before this action waits and runs
                posted_ahead[(rank, index)] = clock[rank]
            for w in waits:
                start, recv, index = posted.pop(w)
                end = max(start + durations.recv, arrival[message(rank, recv)], clock[rank])
                receives[rank][index] = Span(start, end, recv, waited_from=clock[rank])
                clock[rank] = end
            end = clock[rank] + time_of(rank, action)
            spans[rank].append(Span(clock[rank], end, action))
            clock[rank] = end
        return 1

    stuck = play(schedule, advance)
    if stuck:
        rank, index = next(iter(stuck.items()))
        raise ScheduleError(f"{schedule.name} deadlocks: rank {rank} waits at {ops[rank][index]}")
    for rank, after in (finish or {}).items():
        clock[rank] += after
    return Timeline(schedule, durations, spans, max(clock.values(), default=0.0), receives, recv_lookahead, clock)
