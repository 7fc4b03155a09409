"""What a pipeline rank does, as data: actions (F, B, W, BW, F&B, send, recv) on (stage,
micro-batch, direction), and a schedule = every rank's ordered action list plus stage placement.

Conventions the runtime relies on:
- F runs one stage's forward on one micro-batch; BW its whole backward; B only the
  input-gradient half and W the weight-gradient half (a B is always followed, later, by its W).
- F&B runs the forward of one chunk together with the backward (BW) of another, so that one's
  communication hides behind the other's compute (DualPipe). `stage`/`microbatch`/`direction`
  name the forward half; `backward` is the backward half.
- SEND_F(stage s) sends stage s's output activation to `peer`, the rank of stage s+1;
  RECV_F(stage s) receives stage s's input activation from `peer`, the rank of stage s-1;
  SEND_B(stage s) sends the gradient of stage s's input to the rank of stage s-1;
  RECV_B(stage s) receives the gradient of stage s's output from the rank of stage s+1.
  Neighbouring stages on the same rank hand tensors over locally, with no send or recv.
- A SEND may be posted asynchronously (the runtime waits for it before the step ends);
  a RECV completes when its tensor has arrived. A run of consecutive SEND/RECV actions may
  also be posted together as one batch (batch_isend_irecv) and waited on as a whole: the
  validator checks that neither way deadlocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    FB = "F&B"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    def __str__(self) -> str:
        return self.value


COMPUTE_KINDS = frozenset({Kind.F, Kind.B, Kind.W, Kind.BW, Kind.FB})
COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})


@dataclass(frozen=True)
class Action:
    kind: Kind
    stage: int
    microbatch: int
    direction: int = 0
    peer: int | None = None
    backward: Action | None = None

    def __post_init__(self) -> None:
        if (self.peer is None) == (self.kind in COMM_KINDS):
            raise ValueError(f"{self.kind}: a peer rank is given exactly for SEND/RECV actions")
        if (self.backward is None) == (self.kind is Kind.FB):
            raise ValueError(f"{self.kind}: a backward half is given exactly for F&B actions")
        if self.backward is not None and self.backward.kind not in (Kind.B, Kind.BW):
            raise ValueError(f"F&B: its backward half must be B or BW, not {self.backward.kind}")

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def chunk(self) -> tuple[int, int, int]:
        """(direction, stage, microbatch): the unit of work this action's (forward) half touches."""
        return (self.direction, self.stage, self.microbatch)

    def parts(self) -> tuple[Action, ...]:
        """The single-chunk computations this action performs: F&B is an F and a backward."""
        if self.kind is Kind.FB:
            return (Action(Kind.F, self.stage, self.microbatch, self.direction), self.backward)
        return (self,)

    def __str__(self) -> str:
        where = f"s{self.stage}" + (f"d{self.direction}" if self.direction else "")
        if self.kind is Kind.FB:
            return f"F{self.microbatch}{where}&{self.backward}"
        if self.peer is not None:
            arrow = "->" if self.kind in (Kind.SEND_F, Kind.SEND_B) else "<-"
            return f"{self.kind}{self.microbatch}{where}{arrow}r{self.peer}"
        return f"{self.kind}{self.microbatch}{where}"


@dataclass(frozen=True)
class PipelineSchedule:
    """One training step of a pipeline: every rank's ordered actions and where each stage lives.

    `stage_ranks[direction][stage]` is the rank that holds that stage. Single-direction schedules
    have one direction; DualPipe has two (the forward copy and the reverse copy of the model),
    and its micro-batches are split between them: the first half flows in direction 0.
    """

    name: str
    pp: int
    microbatches: int
    stage_ranks: tuple[tuple[int, ...], ...]
    actions: dict[int, list[Action]] = field(compare=False)

    @property
    def num_stages(self) -> int:
        """Stages per model copy (pp, or pp x virtual stages)."""
        return len(self.stage_ranks[0])

    @property
    def directions(self) -> int:
        return len(self.stage_ranks)

    def rank_of(self, stage: int, direction: int = 0) -> int:
        return self.stage_ranks[direction][stage]

    def stages_of(self, rank: int) -> list[tuple[int, int]]:
        """(direction, stage) pairs this rank holds, in order."""
        return [(d, s) for d, ranks in enumerate(self.stage_ranks) for s, r in enumerate(ranks) if r == rank]

    def microbatches_of(self, direction: int) -> range:
        """The micro-batch ids that flow through the model copy of `direction`."""
        per = self.microbatches // self.directions
        return range(direction * per, (direction + 1) * per)

    def compute_actions(self, rank: int) -> list[Action]:
        return [a for a in self.actions[rank] if a.is_compute]
