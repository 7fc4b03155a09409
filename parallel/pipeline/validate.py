"""Checks a schedule before anything runs it: every chunk's F, B and W exactly once on the rank
that holds the stage, each in dependency order, and every send met by its receive without deadlock."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from parallel.pipeline.actions import COMM_KINDS, Kind, PipelineSchedule
from parallel.pipeline.replay import message, play


class ScheduleError(ValueError):
    """A schedule that would compute the wrong thing or hang."""


_MATCH = {Kind.SEND_F: Kind.RECV_F, Kind.SEND_B: Kind.RECV_B}


def _check_counts(schedule: PipelineSchedule) -> None:
    """Each (direction, stage, micro-batch) has one F and one BW or one B + one W, on its rank."""
    seen: Counter = Counter()
    for rank, ops in schedule.actions.items():
        for action in ops:
            if action.kind in COMM_KINDS:
                continue
            for part in action.parts():
                d, s, m = part.chunk
                if not (0 <= d < schedule.directions and 0 <= s < schedule.num_stages):
                    raise ScheduleError(f"rank {rank}: {part} names a stage the schedule does not have")
                if m not in schedule.microbatches_of(d):
                    raise ScheduleError(f"rank {rank}: {part} names a micro-batch outside direction {d}")
                if schedule.rank_of(s, d) != rank:
                    raise ScheduleError(f"rank {rank}: {part} runs on a stage held by rank {schedule.rank_of(s, d)}")
                seen[(part.kind, part.chunk)] += 1
    for d in range(schedule.directions):
        for s in range(schedule.num_stages):
            for m in schedule.microbatches_of(d):
                chunk = (d, s, m)
                f, bw, b, w = (seen[(k, chunk)] for k in (Kind.F, Kind.BW, Kind.B, Kind.W))
                if f != 1 or (bw, b, w) not in ((1, 0, 0), (0, 1, 1)):
                    raise ScheduleError(
                        f"stage {s} direction {d} micro-batch {m}: F x{f}, BW x{bw}, B x{b}, W x{w}; "
                        "expected F once and BW once or B and W once each"
                    )


def _check_local_order(schedule: PipelineSchedule) -> None:
    """On each rank: B/BW after its F, W after its B, sends after what they send; a stage whose
    neighbour sits on the same rank takes its input (or output gradient) from it in order."""
    last = schedule.num_stages - 1
    for rank, ops in schedule.actions.items():
        done: set[tuple] = set()
        received: set[tuple] = set()
        for action in ops:
            d, s, m = action.chunk
            if action.kind in (Kind.RECV_F, Kind.RECV_B):
                received.add((action.kind, d, s, m))
                continue
            if action.kind is Kind.SEND_F and (Kind.F, d, s, m) not in done:
                raise ScheduleError(f"rank {rank}: {action} before the forward it sends")
            if action.kind is Kind.SEND_B and not {(Kind.B, d, s, m), (Kind.BW, d, s, m)} & done:
                raise ScheduleError(f"rank {rank}: {action} before the backward it sends")
            for part in action.parts() if action.is_compute else ():
                d, s, m = part.chunk
                needs = []
                if part.kind is Kind.F and s > 0:
                    local = schedule.rank_of(s - 1, d) == rank
                    needs.append(("F", (Kind.F, d, s - 1, m)) if local else ("RECV_F", (Kind.RECV_F, d, s, m)))
                if part.kind in (Kind.B, Kind.BW):
                    needs.append(("F", (Kind.F, d, s, m)))
                    if s < last:
                        local = schedule.rank_of(s + 1, d) == rank
                        needs.append(("B", (Kind.B, d, s + 1, m)) if local else ("RECV_B", (Kind.RECV_B, d, s, m)))
                if part.kind is Kind.W:
                    needs.append(("B", (Kind.B, d, s, m)))
                for what, key in needs:
                    have = key in done or key in received
                    if not have and key[0] is Kind.B:
                        have = (Kind.BW, *key[1:]) in done
                    if not have:
                        raise ScheduleError(f"rank {rank}: {part} runs before its {what} of stage {key[2]}")
                done.add((part.kind, d, s, m))


def _run(schedule: PipelineSchedule, batched: bool) -> None:
    """Play the schedule with point-to-point semantics and fail on a deadlock.

    batched=False: a SEND is posted and the rank moves on; a RECV blocks until its SEND is posted.
    batched=True: each run of consecutive SEND/RECV actions is posted as one batch and the rank
    waits until every operation in it has met its partner in the peer's current batch
    (blocking rendezvous, as NCCL send/recv inside a group).
    """
    ops = schedule.actions
    posted: set[tuple] = set()
    matched: set[tuple[int, int]] = set()  # (rank, index) of batched operations that met their partner

    def batch(rank: int, start: int) -> range:
        end = start
        while end < len(ops[rank]) and ops[rank][end].kind in COMM_KINDS:
            end += 1
        return range(start, end)

    def advance(rank: int, pos: Mapping[int, int]) -> int:
        action = ops[rank][pos[rank]]
        if action.is_compute:
            return 1
        if not batched:
            key = message(rank, action)
            if action.kind in _MATCH:
                if key in posted:
                    raise ScheduleError(f"rank {rank}: {action} is sent twice")
                posted.add(key)
            return 1 if key in posted else 0
        mine = batch(rank, pos[rank])
        for i in mine:
            if (rank, i) in matched:
                continue
            key, peer = message(rank, ops[rank][i]), ops[rank][i].peer
            for j in batch(peer, pos[peer]):
                if (peer, j) not in matched and message(peer, ops[peer][j]) == key:
                    matched.update({(rank, i), (peer, j)})
                    break
        return len(mine) if all((rank, i) in matched for i in mine) else 0

    stuck = play(schedule, advance)
    if stuck:
        mode = "batched rendezvous" if batched else "asynchronous sends"
        waits = "; ".join(f"rank {r} at {ops[r][i]}" for r, i in stuck.items())
        raise ScheduleError(f"{schedule.name} deadlocks with {mode}: {waits}")


def _check_matching(schedule: PipelineSchedule) -> None:
    """Every SEND has exactly one RECV on its peer, from this rank, for the same tensor."""
    sends: Counter = Counter()
    recvs: Counter = Counter()
    for rank, ops in schedule.actions.items():
        for action in ops:
            if action.kind in _MATCH:
                sends[message(rank, action)] += 1
            elif action.kind in COMM_KINDS:
                recvs[message(rank, action)] += 1
    if sends != recvs:
        unmatched = (sends - recvs) + (recvs - sends)
        sender, receiver, kind, d, s, m = next(iter(unmatched))
        raise ScheduleError(
            f"{kind} of stage {s} direction {d} micro-batch {m} from rank {sender} to rank {receiver}: "
            f"sent {sends[(sender, receiver, kind, d, s, m)]}x, received {recvs[(sender, receiver, kind, d, s, m)]}x"
        )
    for rank, ops in schedule.actions.items():
        for action in ops:
            if action.kind in COMM_KINDS:
                d, s, _ = action.chunk
                other = s + 1 if action.kind in (Kind.SEND_F, Kind.RECV_B) else s - 1
                if not 0 <= other < schedule.num_stages or schedule.rank_of(other, d) != action.peer:
                    raise ScheduleError(f"rank {rank}: {action}: the neighbouring stage is not on rank {action.peer}")


def _check_pair_order(schedule: PipelineSchedule) -> None:
    """Between any two ranks, tensors are received in the order they were sent."""
    sent: dict[tuple[int, int], list[tuple]] = {}
    received: dict[tuple[int, int], list[tuple]] = {}
    for rank, ops in schedule.actions.items():
        for action in ops:
            if action.kind in COMM_KINDS:
                key = message(rank, action)
                (sent if action.kind in _MATCH else received).setdefault(key[:2], []).append(key)

    def tensor(key: tuple) -> str:
        what = "activation into" if key[2] is Kind.RECV_F else "gradient into"
        return f"the {what} stage {key[4]} of micro-batch {key[5]}"

    for pair, order in sent.items():
        for i, (mine, theirs) in enumerate(zip(order, received[pair], strict=True)):
            if mine != theirs:
                raise ScheduleError(
                    f"{schedule.name}: rank {pair[0]}'s message {i} to rank {pair[1]} is {tensor(mine)}, "
                    f"but rank {pair[1]} receives {tensor(theirs)} there"
                )


def validate_schedule(schedule: PipelineSchedule, rendezvous: bool = False, ordered: bool = False) -> None:
    """Raise ScheduleError naming the first problem; return None for a schedule that is sound.

    Sends are taken as asynchronous (posted, waited for at the end of the step) and each
    receive as naming its tensor. Two stricter runtimes can be checked too:
    `rendezvous`: each run of consecutive sends/recvs is one blocking batch (NCCL send/recv in
    a group); `ordered`: between two ranks, tensors are received in the order they were sent
    (tag-less point-to-point: NCCL matches a pair's messages by the order they are posted).
    build_schedule's schedules pass both (schedules.py places each receive in its send's batch)."""
    if sorted(schedule.actions) != list(range(schedule.pp)):
        raise ScheduleError(
            f"{schedule.name}: actions for ranks {sorted(schedule.actions)}, expected 0..{schedule.pp - 1}"
        )
    _check_counts(schedule)
    _check_matching(schedule)
    _check_local_order(schedule)
    _run(schedule, batched=False)
    if rendezvous:
        _run(schedule, batched=True)
    if ordered:
        _check_pair_order(schedule)
