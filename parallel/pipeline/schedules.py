"""The schedule generators (gpipe, 1f1b, interleaved_1f1b, zb1p, dualpipev, dualpipe): each
writes every rank's compute order; `build_schedule` checks the sizes and adds the sends/recvs."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from parallel.pipeline.actions import Action, Kind, PipelineSchedule
from parallel.pipeline.replay import message

PIPELINE_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zb1p", "dualpipev", "dualpipe")


def _f(stage: int, mb: int, direction: int = 0) -> Action:
    return Action(Kind.F, stage, mb, direction)


def _bw(stage: int, mb: int, direction: int = 0) -> Action:
    return Action(Kind.BW, stage, mb, direction)


def _gpipe(pp: int, n: int) -> dict[int, list[Action]]:
    """All forwards, then all backwards."""
    return {r: [_f(r, m) for m in range(n)] + [_bw(r, m) for m in range(n)] for r in range(pp)}


def _one_f_one_b(pp: int, n: int, split_backward: bool) -> dict[int, list[Action]]:
    """1F1B: rank r runs pp-1-r forwards ahead, then alternates one forward and one backward,
    then drains the backwards. With `split_backward` (ZB-H1) each backward is B with its W
    deferred: rank r holds back r of them during the steady phase, so the W's fill the
    cool-down gaps while the input gradients race ahead to the first rank."""
    schedule = {}
    for r in range(pp):
        warmup = min(pp - 1 - r, n)
        ops = [_f(r, m) for m in range(warmup)]
        deferred: deque[Action] = deque()
        for i in range(n):
            if warmup + i < n:
                ops.append(_f(r, warmup + i))
            if not split_backward:
                ops.append(_bw(r, i))
                continue
            ops.append(Action(Kind.B, r, i))
            deferred.append(Action(Kind.W, r, i))
            if i >= r:
                ops.append(deferred.popleft())
        ops.extend(deferred)
        schedule[r] = ops
    return schedule


def _interleaved(pp: int, n: int, virtual: int) -> dict[int, list[Action]]:
    """Interleaved 1F1B (Megatron): rank r holds stages r, r+pp, ...; micro-batches go through
    each of its stages in rounds of pp; warm-up 2(pp-1-r) + (virtual-1)pp forwards."""
    total = n * virtual

    def stage_and_mb(rank: int, k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // pp) % virtual
        if backward:
            chunk = virtual - 1 - chunk
        return chunk * pp + rank, (k // (pp * virtual)) * pp + k % pp

    schedule = {}
    for r in range(pp):
        warmup = min(2 * (pp - 1 - r) + (virtual - 1) * pp, total)
        ops = [_f(*stage_and_mb(r, k, False)) for k in range(warmup)]
        for i in range(total):
            if warmup + i < total:
                ops.append(_f(*stage_and_mb(r, warmup + i, False)))
            ops.append(_bw(*stage_and_mb(r, i, True)))
        schedule[r] = ops
    return schedule


def _dualpipe_rank(
    ranks: int, r: int, n: int, chunks: tuple[tuple[int, int], tuple[int, int]], mbs: tuple[range, range]
) -> list[Action]:
    """One rank's DualPipe order over its two chunks (phase 0 is the one micro-batches reach
    first). `ranks` is the number of ranks one micro-batch passes on the way in (pp for the
    V-shape, pp/2 for each half of DualPipe), `r` this rank's position on that way, `n` the
    micro-batches per chunk. Eight phases: warm-up forwards, forwards of both chunks,
    zero-bubble B/W/F, the steady F&B pairs, the drain of forwards, both backwards, the
    deferred weight gradients."""
    ops: list[Action] = []
    next_f: list[Iterator[int]] = [iter(mbs[0]), iter(mbs[1])]
    next_b: list[Iterator[int]] = [iter(mbs[0]), iter(mbs[1])]
    deferred: deque[Action] = deque()

    def forward(phase: int) -> Action:
        stage, direction = chunks[phase]
        return Action(Kind.F, stage, next(next_f[phase]), direction)

    def backward(phase: int, split: bool = False) -> Action:
        stage, direction = chunks[phase]
        mb = next(next_b[phase])
        if not split:
            return Action(Kind.BW, stage, mb, direction)
        deferred.append(Action(Kind.W, stage, mb, direction))
        return Action(Kind.B, stage, mb, direction)

    def overlapped(f_phase: int, b_phase: int) -> Action:
        f = forward(f_phase)
        return Action(Kind.FB, f.stage, f.microbatch, f.direction, backward=backward(b_phase))

    farthest = r == ranks - 1  # where phase 0 turns into phase 1
    # 1: forwards of the first chunk, deeper the farther the rank is from the turn
    ops += [forward(0) for _ in range(2 * (ranks - 1 - r))]
    # 2: forwards of both chunks in turn
    for _ in range(r + 1):
        ops += [forward(0), forward(1)]
    # 3: the first backwards of chunk 1, weight gradient right after, and more chunk-1 forwards
    for _ in range(ranks - 1 - r):
        ops.append(backward(1, split=True))
        ops.append(deferred.popleft())
        ops.append(forward(1))
    # 4: the steady state: F(0)&B(1), F(1)&B(0); the turning rank runs its first pair apart so
    #    chunk 1's first backward starts without waiting on the overlap
    for i in range(n - 2 * ranks + r + 1):
        if i == 0 and farthest:
            ops += [forward(0), backward(1)]
        else:
            ops.append(overlapped(0, 1))
        ops.append(overlapped(1, 0))
    # 5: chunk 0 has no forwards left
    for _ in range(ranks - 1 - r):
        ops += [backward(1), overlapped(1, 0)]
    # 6: both backwards in turn; the later half defers W to fill the tail
    for i in range(r + 1):
        ops.append(backward(1, split=2 * i >= r + 1))
        ops.append(backward(0, split=2 * i + 1 >= r + 1))
    # 7: weight gradients between the last chunk-0 backwards
    for _ in range(ranks - 1 - r):
        ops.append(deferred.popleft())
        ops.append(backward(0, split=True))
    # 8: the rest of the weight gradients
    ops.extend(deferred)
    return ops


def _dualpipev(pp: int, n: int) -> dict[int, list[Action]]:
    """DualPipeV: 2pp stages in a V; rank r holds stage r and stage 2pp-1-r."""
    mbs = range(n)
    return {r: _dualpipe_rank(pp, r, n, ((r, 0), (2 * pp - 1 - r, 0)), (mbs, mbs)) for r in range(pp)}


def _dualpipe(pp: int, n: int) -> dict[int, list[Action]]:
    """DualPipe: two copies of pp stages; rank r holds stage r of the forward copy (direction 0,
    micro-batches enter at rank 0) and stage pp-1-r of the reverse copy (direction 1, they
    enter at rank pp-1). Each half of the ranks treats the copy that reaches it first as its
    phase 0, so the two halves mirror each other."""
    half, per = pp // 2, n // 2
    down, up = range(per), range(per, n)
    schedule = {}
    for r in range(pp):
        forward_copy, reverse_copy = (r, 0), (pp - 1 - r, 1)
        if r < half:
            schedule[r] = _dualpipe_rank(half, r, per, (forward_copy, reverse_copy), (down, up))
        else:
            schedule[r] = _dualpipe_rank(half, pp - 1 - r, per, (reverse_copy, forward_copy), (up, down))
    return schedule


def stage_placement(name: str, pp: int, virtual_stages: int = 2) -> tuple[tuple[int, ...], ...]:
    """`[direction][stage] -> rank` for schedule `name` on `pp` ranks."""
    if name == "interleaved_1f1b":
        return (tuple(s % pp for s in range(pp * virtual_stages)),)
    if name == "dualpipev":
        return (tuple(range(pp)) + tuple(reversed(range(pp))),)
    if name == "dualpipe":
        return (tuple(range(pp)), tuple(reversed(range(pp))))
    return (tuple(range(pp)),)


def check_schedule_args(name: str, pp: int, microbatches: int, virtual_stages: int = 2) -> None:
    """Raise ValueError (one line naming the value and what is allowed) for sizes a schedule cannot run."""
    if name not in PIPELINE_SCHEDULES:
        raise ValueError(f"pipeline schedule {name!r}: allowed: {', '.join(PIPELINE_SCHEDULES)}")
    if pp < 1:
        raise ValueError(f"pp={pp}: must be >= 1")
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches}: must be >= 1")
    if name == "interleaved_1f1b":
        if virtual_stages < 2:
            raise ValueError(f"virtual_stages={virtual_stages}: interleaved_1f1b needs >= 2 stages per rank")
        if microbatches % pp:
            raise ValueError(f"microbatches={microbatches}: interleaved_1f1b needs a multiple of pp={pp}")
    if name == "dualpipev":
        if pp < 2:
            raise ValueError(f"pp={pp}: dualpipev needs pp >= 2")
        if microbatches < 2 * pp - 1:
            raise ValueError(f"microbatches={microbatches}: dualpipev needs >= 2*pp-1 = {2 * pp - 1}")
    if name == "dualpipe":
        if pp < 2 or pp % 2:
            raise ValueError(f"pp={pp}: dualpipe needs an even pp >= 2")
        if microbatches % 2 or microbatches < 2 * pp - 2:
            raise ValueError(
                f"microbatches={microbatches}: dualpipe needs an even number >= 2*pp-2 = {2 * pp - 2} "
                "(half flow each way)"
            )


def _with_communication(compute: dict[int, list[Action]], stage_ranks: tuple[tuple[int, ...], ...]) -> dict:
    """Place every send and receive, by playing the compute lists in lock-step rounds: between two
    compute actions a rank posts one batch of point-to-point operations, the sends of the action
    it just ran and a receive for each tensor a peer sends it meanwhile, so each receive is posted
    together with its send (never late) and each pair's messages are received in the order they
    were sent (NCCL matches them by order; it has no tags). A rank runs its next compute action
    once the tensors it needs have come in; the batch it leaves then is its next run of SEND/RECV
    actions. Each batch's operations meet partners in the peers' batches of the same round, so
    posted as one group (batch_isend_irecv) they cannot deadlock (validate.py checks it)."""
    last = len(stage_ranks[0]) - 1

    def rank_of(direction: int, stage: int) -> int:
        return stage_ranks[direction][stage]

    def needs(rank: int, part: Action) -> list[tuple]:
        """The messages `part` receives: (sender, receiver, kind, direction, stage, micro-batch)."""
        d, s, m = part.chunk
        if part.kind is Kind.F and s > 0 and rank_of(d, s - 1) != rank:
            return [(rank_of(d, s - 1), rank, Kind.RECV_F, d, s, m)]
        if part.kind in (Kind.B, Kind.BW) and s < last and rank_of(d, s + 1) != rank:
            return [(rank_of(d, s + 1), rank, Kind.RECV_B, d, s, m)]
        return []

    def sends(rank: int, part: Action) -> list[Action]:
        d, s, m = part.chunk
        if part.kind is Kind.F and s < last and rank_of(d, s + 1) != rank:
            return [Action(Kind.SEND_F, s, m, d, peer=rank_of(d, s + 1))]
        if part.kind in (Kind.B, Kind.BW) and s > 0 and rank_of(d, s - 1) != rank:
            return [Action(Kind.SEND_B, s, m, d, peer=rank_of(d, s - 1))]
        return []

    out: dict[int, list[Action]] = {rank: [] for rank in compute}
    pos = dict.fromkeys(compute, 0)
    received: set[tuple] = set()
    while any(pos[r] < len(ops) for r, ops in compute.items()):
        ran = False
        for rank, ops in compute.items():  # run every compute action whose tensors are in
            if pos[rank] < len(ops) and all(k in received for p in ops[pos[rank]].parts() for k in needs(rank, p)):
                action = ops[pos[rank]]
                out[rank].append(action)
                pos[rank] += 1
                ran = True
                for send in (c for p in action.parts() for c in sends(rank, p)):
                    out[rank].append(send)  # posted right after its compute, received in the same batch
                    _, _, kind, d, s, m = key = message(rank, send)
                    out[send.peer].append(Action(kind, s, m, d, peer=rank))
                    received.add(key)
        if not ran:
            stuck = {r: str(ops[pos[r]]) for r, ops in compute.items() if pos[r] < len(ops)}
            raise ValueError(f"the compute order waits for tensors no rank sends: {stuck}")
    return out


_GENERATORS: dict[str, Callable[[int, int, int], dict[int, list[Action]]]] = {
    "gpipe": lambda pp, n, v: _gpipe(pp, n),
    "1f1b": lambda pp, n, v: _one_f_one_b(pp, n, split_backward=False),
    "zb1p": lambda pp, n, v: _one_f_one_b(pp, n, split_backward=True),
    "interleaved_1f1b": _interleaved,
    "dualpipev": lambda pp, n, v: _dualpipev(pp, n),
    "dualpipe": lambda pp, n, v: _dualpipe(pp, n),
}


def build_schedule(name: str, pp: int, microbatches: int, virtual_stages: int = 2) -> PipelineSchedule:
    """The schedule `name` for `pp` ranks and `microbatches` micro-batches per step, with its
    sends and receives. `virtual_stages` (stages per rank) only applies to interleaved_1f1b;
    dualpipev always holds 2 stages per rank and dualpipe 2 model copies."""
    check_schedule_args(name, pp, microbatches, virtual_stages)
    stage_ranks = stage_placement(name, pp, virtual_stages)
    compute = _GENERATORS[name](pp, microbatches, virtual_stages)
    return PipelineSchedule(name, pp, microbatches, stage_ranks, _with_communication(compute, stage_ranks))


def published_bubble(name: str, pp: int, f: float, b: float, w: float, fb: float) -> tuple[str, float]:
    """The bubble the literature gives for `name` (the DualPipe README's table; GPipe and
    Megatron's interleaved 1F1B per chunk), as (formula, value). Its B is the full backward, our
    b + w; PP counts stages, which is 2pp for dualpipev. The formulas assume F = B_input = W for
    zb1p and the DualPipe pair, and max(F, b + w) <= F&B <= F + b + w for the DualPipe pair."""
    full = b + w
    if name in ("gpipe", "1f1b", "interleaved_1f1b"):
        return "(PP-1)(F+B)", (pp - 1) * (f + full)
    if name == "zb1p":
        return "(PP-1)(F+B-2W)", (pp - 1) * (f + full - 2 * w)
    stages = 2 * pp if name == "dualpipev" else pp
    if name in ("dualpipe", "dualpipev"):
        return f"(PP/2-1)(F&B+B-3W), PP={stages}", (stages // 2 - 1) * (fb + full - 3 * w)
    raise ValueError(f"pipeline schedule {name!r}: allowed: {', '.join(PIPELINE_SCHEDULES)}")
