"""Plays every rank's action list in turn, each rank as far as its receives allow: the walk the
validator (does it deadlock?) and the simulator (when does each action run?) share; and where
the runtime posts a receive ahead of its batch (the one rule the runtime and the simulator use)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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


def receives_posted_ahead(actions: Sequence[Action], lookahead: int) -> dict[int, int]:
    """Where the runtime posts receives `lookahead` compute actions ahead (gloo moves a tensor only
    once its receive is posted): before each compute action it posts, in list order, every receive
    up to the `lookahead`-th compute action after it that is not posted yet. -> {index of a RECV
    in `actions`: index of the compute action before which it is posted}; the receives before the
    first compute action (and all of them at look-ahead 0) are posted with their batch instead."""
    if lookahead < 0:
        raise ValueError(f"recv_lookahead={lookahead}: must be >= 0 (compute actions ahead)")
    computes: list[int] = []  # indices of the compute actions seen so far
    posted_before: dict[int, int] = {}
    for index, action in enumerate(actions):
        if action.is_compute:
            computes.append(index)
        elif lookahead and computes and action.kind in (Kind.RECV_F, Kind.RECV_B):
            # the earliest compute action with fewer than `lookahead` compute actions between it and the receive
            posted_before[index] = computes[max(0, len(computes) - lookahead)]
    return posted_before


def receives_posted_before(actions: Sequence[Action], lookahead: int) -> dict[int, list[int]]:
    """receives_posted_ahead by the compute action that posts them: {index of a compute action:
    the indices of the RECVs posted just before it, in list order} (what the runtime and the
    simulator look up as they reach each compute action)."""
    before: dict[int, list[int]] = {}
    for recv_index, compute_index in receives_posted_ahead(actions, lookahead).items():
        before.setdefault(compute_index, []).append(recv_index)
    return before


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
