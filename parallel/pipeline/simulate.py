"""Times a schedule without a model: given how long F, B, W, BW and F&B take (and a message),
each rank's timeline, the step time and each rank's bubble (idle time within the step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parallel.pipeline.actions import Action, Kind, PipelineSchedule
from parallel.pipeline.validate import ScheduleError


@dataclass(frozen=True)
class Durations:
    """Time per action on one stage and one micro-batch, in any unit.

    f: forward; b: input-gradient backward; w: weight-gradient backward (a full backward BW
    takes b + w); fb: one F&B, a forward overlapped with a full backward (None: f + b + w,
    i.e. no gain from the overlap); comm: a point-to-point message's latency (sends are
    asynchronous, so it only delays the receiver).
    """

    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "comm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: durations must be >= 0")
        if self.fb is not None and self.fb < 0:
            raise ValueError(f"fb={self.fb}: durations must be >= 0")

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


@dataclass(frozen=True)
class Timeline:
    """The simulated step: compute spans per rank (in order), step time, idle time per rank."""

    schedule: PipelineSchedule
    durations: Durations
    spans: dict[int, list[Span]]
    step_time: float

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
) -> Timeline:
    """Run the schedule on a clock: a rank starts each compute action as soon as its previous
    one ended and its receives have arrived (a message lands `comm` after its send is posted).
    `time_of(rank, action)`, when given, overrides the uniform times per action (e.g. measured
    per stage, or scaled by the stage cut's costs)."""
    durations = durations or Durations()
    time_of = time_of or (lambda rank, action: durations.of(action))
    ops = schedule.actions
    pos = {r: 0 for r in ops}
    clock = {r: 0.0 for r in ops}
    arrival: dict[tuple, float] = {}
    spans: dict[int, list[Span]] = {r: [] for r in ops}
    progress = True
    while progress:
        progress = False
        for rank in ops:
            while pos[rank] < len(ops[rank]):
                action = ops[rank][pos[rank]]
                d, s, m = action.chunk
                if action.kind is Kind.SEND_F:
                    arrival[(rank, action.peer, Kind.RECV_F, d, s + 1, m)] = clock[rank] + durations.comm
                elif action.kind is Kind.SEND_B:
                    arrival[(rank, action.peer, Kind.RECV_B, d, s - 1, m)] = clock[rank] + durations.comm
                elif action.kind in (Kind.RECV_F, Kind.RECV_B):
                    key = (action.peer, rank, action.kind, d, s, m)
                    if key not in arrival:
                        break
                    clock[rank] = max(clock[rank], arrival[key])
                else:
                    end = clock[rank] + time_of(rank, action)
                    spans[rank].append(Span(clock[rank], end, action))
                    clock[rank] = end
                pos[rank] += 1
                progress = True
    stuck = [r for r in ops if pos[r] < len(ops[r])]
    if stuck:
        raise ScheduleError(f"{schedule.name} deadlocks: rank {stuck[0]} waits at {ops[stuck[0]][pos[stuck[0]]]}")
    return Timeline(schedule, durations, spans, max(clock.values(), default=0.0))
