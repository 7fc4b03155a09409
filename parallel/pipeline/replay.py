"""Plays every rank's action list in turn, each rank as far as its receives allow: the walk the
validator (does it deadlock?) and the simulator (when does each action run?) share."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from parallel.pipeline.actions import Action, Kind, PipelineSchedule


def message(rank: int, action: Action) -> tuple:
    """The identity of the tensor a SEND or RECV on `rank` moves: (sender, receiver, kind,
    direction, stage, micro-batch), named from the receiver's side so a SEND and its RECV agree."""
    d, s, m = action.chunk
    if action.kind is Kind.SEND_F:
        return (rank, action.peer, Kind.RECV_F, d, s + 1, m)
    if action.kind is Kind.SEND_B:
        return (rank, action.peer, Kind.RECV_B, d, s - 1, m)
    return (action.peer, rank, action.kind, d, s, m)


def play(schedule: PipelineSchedule, advance: Callable[[int, Mapping[int, int]], int]) -> dict[int, int]:
    """Visit the ranks round-robin; on each, call `advance(rank, position)` for its next action,
    `schedule.actions[rank][position[rank]]` (`position` holds every rank's next index), until it
    returns 0: the rank must wait, e.g. for a receive whose send is not posted yet. `advance`
    returns how many actions it consumed (1, or a whole batch). Stops when a full round makes no
    progress; -> {rank: index it is stuck at} (empty: every rank finished)."""
    ops = schedule.actions
    pos = {r: 0 for r in ops}
    progress = True
    while progress:
        progress = False
        for rank in ops:
            while pos[rank] < len(ops[rank]):
                consumed = advance(rank, pos)
                if not consumed:
                    break
                pos[rank] += consumed
                progress = True
    return {r: i for r, i in pos.items() if i < len(ops[r])}
