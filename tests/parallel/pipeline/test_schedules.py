"""The schedule generators: every schedule valid at pp 2/4/8 and several micro-batch counts,
stage placement as documented, and the simulator reproducing the published bubbles."""

import pytest

from parallel.pipeline import (
    PIPELINE_SCHEDULES,
    Action,
    Durations,
    Kind,
    ScheduleError,
    build_schedule,
    simulate,
    validate_schedule,
)
from parallel.pipeline.schedules import published_bubble


def microbatch_counts(name: str, pp: int) -> list[int]:
    """The smallest count each schedule allows, and a few above it."""
    if name == "interleaved_1f1b":
        return [pp, 2 * pp, 3 * pp]
    if name == "dualpipev":
        return [2 * pp - 1, 2 * pp, 3 * pp + 1]
    if name == "dualpipe":
        return [2 * pp - 2, 2 * pp, 3 * pp + 2]
    return [1, pp - 1, pp, 2 * pp + 1]


CASES = [(name, pp, n) for name in PIPELINE_SCHEDULES for pp in (2, 4, 8) for n in microbatch_counts(name, pp) if n]


@pytest.mark.parametrize("name,pp,n", CASES)
def test_every_schedule_runs_each_chunk_once_in_order_without_deadlock(name, pp, n):
    schedule = build_schedule(name, pp, n)
    validate_schedule(schedule)  # raises on a missing/duplicate chunk, a bad order, or a deadlock
    computed = sum(len(a.parts()) for r in schedule.actions for a in schedule.compute_actions(r))
    halves = sum(
        1 for r in schedule.actions for a in schedule.compute_actions(r) for p in a.parts() if p.kind is Kind.B
    )
    assert computed == 2 * schedule.num_stages * n + halves  # F and backward per (stage, mb), + W per split B
    simulate(schedule)  # the timing run finishes too


@pytest.mark.parametrize("name,pp,n", [c for c in CASES if c[1] in (2, 4)])
def test_every_schedule_receives_in_send_order_and_runs_with_blocking_batches(name, pp, n):
    """NCCL has no tags: between two ranks it matches messages in the order they are posted, and
    a batch (one NCCL group) of sends and receives completes only when all of them met their
    partners. Every schedule receives each pair's tensors in the order they were sent, and each
    run of SEND/RECV actions, taken as one blocking batch, meets its partners without deadlock."""
    validate_schedule(build_schedule(name, pp, n), rendezvous=True, ordered=True)


def _bw(stage: int, mb: int) -> Action:
    return Action(Kind.BW, stage, mb)


def test_receives_are_posted_with_their_sends_in_send_order():
    """dualpipev, pp=4: rank 1 needs the activation of micro-batch 6 only after two gradients
    that rank 0 sent later; it receives (and keeps) the activation first, in the batch in which
    rank 0 sends it, so the tensors of a pair come in in the order they were sent."""
    schedule = build_schedule("dualpipev", 4, 8)
    validate_schedule(schedule, ordered=True)
    ops = schedule.actions[1]
    kept = ops[ops.index(Action(Kind.RECV_F, 1, 6, peer=0)) : ops.index(Action(Kind.FB, 1, 6, backward=_bw(6, 2)))]
    assert [str(a) for a in kept if a.is_compute] == ["F5s1", "F1s6", "B0s6", "W0s6", "F2s6", "B1s6", "W1s6", "F3s6"]
    sent = schedule.actions[0].index(Action(Kind.SEND_F, 0, 6, peer=1))
    assert str(schedule.actions[0][sent - 1]) == "F6s0"  # sent right after its forward


def test_ordered_check_names_two_tensors_received_out_of_send_order():
    schedule = build_schedule("gpipe", 2, 2)
    ops = schedule.actions[1]
    ops.insert(0, ops.pop(ops.index(Action(Kind.RECV_F, 1, 1, peer=0))))  # posted before micro-batch 0's
    with pytest.raises(
        ScheduleError,
        match="rank 0's message 0 to rank 1 is the activation into stage 1 of micro-batch 0, "
        "but rank 1 receives the activation into stage 1 of micro-batch 1",
    ):
        validate_schedule(schedule, ordered=True)


def test_stage_placement():
    v = build_schedule("dualpipev", 4, 8)
    assert [v.stages_of(r) for r in range(4)] == [
        [(0, 0), (0, 7)],
        [(0, 1), (0, 6)],
        [(0, 2), (0, 5)],
        [(0, 3), (0, 4)],
    ]
    d = build_schedule("dualpipe", 4, 8)
    assert d.directions == 2 and d.num_stages == 4
    assert [d.stages_of(r) for r in range(4)] == [
        [(0, 0), (1, 3)],
        [(0, 1), (1, 2)],
        [(0, 2), (1, 1)],
        [(0, 3), (1, 0)],
    ]
    assert list(d.microbatches_of(0)) == [0, 1, 2, 3] and list(d.microbatches_of(1)) == [4, 5, 6, 7]
    i = build_schedule("interleaved_1f1b", 2, 4, virtual_stages=3)
    assert i.stages_of(1) == [(0, 1), (0, 3), (0, 5)]


def test_dualpipe_overlaps_forward_with_backward_and_sends_to_neighbours():
    schedule = build_schedule("dualpipev", 4, 10)
    pairs = [a for a in schedule.actions[1] if a.kind is Kind.FB]
    assert pairs and all(a.backward.kind is Kind.BW for a in pairs)
    assert {a.peer for a in schedule.actions[1] if not a.is_compute} == {0, 2}
    # the turn of the V is local: rank 3 holds stages 3 and 4, so stage 3 sends nothing onward
    assert not [a for a in schedule.actions[3] if a.kind is Kind.SEND_F and a.stage == 3]


def test_validator_catches_broken_schedules():
    def broken(edit):
        schedule = build_schedule("1f1b", 2, 3)
        edit(schedule.actions)
        with pytest.raises(ScheduleError) as err:
            validate_schedule(schedule)
        return str(err.value)

    def drop_backward(acts):
        acts[1].remove(next(a for a in acts[1] if a.kind is Kind.BW))

    assert "BW x0" in broken(drop_backward)

    def backward_first(acts):
        i, j = (next(k for k, a in enumerate(acts[1]) if a.kind is kind) for kind in (Kind.F, Kind.BW))
        acts[1][i], acts[1][j] = acts[1][j], acts[1][i]

    assert "runs before its F" in broken(backward_first)

    def receive_gradient_first(acts):
        recv = next(a for a in acts[0] if a.kind is Kind.RECV_B)
        acts[0].remove(recv)
        acts[0].insert(0, recv)

    assert "deadlocks" in broken(receive_gradient_first)

    def drop_send(acts):
        acts[0].remove(next(a for a in acts[0] if a.kind is Kind.SEND_F))

    assert "sent 0x, received 1x" in broken(drop_send)


def test_actions_reject_inconsistent_fields():
    with pytest.raises(ValueError, match="peer"):
        Action(Kind.SEND_F, 0, 0)
    with pytest.raises(ValueError, match="peer"):
        Action(Kind.F, 0, 0, peer=1)
    with pytest.raises(ValueError, match="backward half must be B or BW"):
        Action(Kind.FB, 0, 0, backward=Action(Kind.F, 1, 0))
    overlapped = Action(Kind.FB, 0, 3, backward=Action(Kind.BW, 1, 1))
    assert overlapped.parts() == (Action(Kind.F, 0, 3), Action(Kind.BW, 1, 1))


@pytest.mark.parametrize(
    "name,pp,n,message",
    [
        ("dualpipe", 3, 8, "pp=3: dualpipe needs an even pp"),
        ("dualpipe", 4, 7, "microbatches=7: dualpipe needs an even number >= 2\\*pp-2 = 6"),
        ("dualpipe", 4, 4, "microbatches=4"),
        ("dualpipev", 4, 6, "microbatches=6: dualpipev needs >= 2\\*pp-1 = 7"),
        ("dualpipev", 1, 6, "pp=1: dualpipev needs pp >= 2"),
        ("interleaved_1f1b", 4, 6, "multiple of pp=4"),
        ("1f1b", 0, 6, "pp=0: must be >= 1"),
        ("1f1b", 2, 0, "microbatches=0"),
        ("bogus", 2, 2, "allowed: 1f1b, gpipe"),
    ],
)
def test_bad_sizes_are_refused_in_one_line(name, pp, n, message):
    with pytest.raises(ValueError, match=message) as err:
        build_schedule(name, pp, n)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved_1f1b", "zb1p"])
@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("t", [1.0, 0.5])
def test_uniform_times_give_the_published_bubble_on_every_rank(name, pp, t):
    """1F1B and GPipe (PP-1)(F+B), ZB1P (PP-1)(F+B-2W) with B the full backward = b + w;
    interleaved 1F1B the same as 1F1B in chunk times (Megatron's (PP-1)(F+B)/v of a whole rank)."""
    n = 2 * pp
    timeline = simulate(build_schedule(name, pp, n), Durations(f=t, b=t, w=t))
    _, expected = published_bubble(name, pp, t, t, t, 3 * t)
    assert set(timeline.bubbles.values()) == {expected}
    work = n * (3 * t) * (2 if name == "interleaved_1f1b" else 1)
    assert timeline.step_time == work + expected


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("fb", [2.0, 2.5, 3.0])
def test_dualpipe_bubble_is_the_published_one(name, pp, fb):
    """(PP/2-1)(F&B+B-3W) with PP the number of stages (2pp for the V-shape, as the DualPipe
    README counts), for uniform F = b = W and any F&B from the full backward alone (perfect
    overlap) to F + full backward (none): the worst rank's bubble; no rank idles longer."""
    for n in (2 * pp, 4 * pp + 2):
        timeline = simulate(build_schedule(name, pp, n), Durations(f=1, b=1, w=1, fb=fb))
        _, expected = published_bubble(name, pp, 1, 1, 1, fb)
        assert max(timeline.bubbles.values()) == pytest.approx(expected)


def test_dualpipev_beats_1f1b_at_the_same_ranks_and_microbatches():
    """Same model on 4 ranks: a 1F1B stage is two V stages, so its times double."""
    one_f_one_b = simulate(build_schedule("1f1b", 4, 16), Durations(f=2, b=2, w=2))
    dualpipev = simulate(build_schedule("dualpipev", 4, 16), Durations(f=1, b=1, w=1, fb=2.5))
    assert dualpipev.step_time < one_f_one_b.step_time
    assert dualpipev.bubble_share < one_f_one_b.bubble_share


def test_communication_latency_delays_the_receiver():
    """GPipe's critical path crosses pp-1 links forward and pp-1 back; 1F1B, whose warm-up leaves
    no slack, also waits a round trip in its steady state."""
    gpipe = build_schedule("gpipe", 4, 8)
    assert simulate(gpipe, Durations(comm=0.5)).step_time == simulate(gpipe).step_time + 2 * 3 * 0.5
    one_f_one_b = build_schedule("1f1b", 4, 8)
    assert simulate(one_f_one_b, Durations(comm=0.5)).step_time > simulate(one_f_one_b).step_time + 3
    with pytest.raises(ValueError, match="comm=-1"):
        Durations(comm=-1)


def test_times_per_action_override_the_uniform_ones():
    """A last stage twice as slow (a heavy head) stretches 1F1B's steady state to its pace."""
    schedule = build_schedule("1f1b", 2, 4)

    def time_of(rank, action):
        return Durations().of(action) * (2 if action.stage == 1 else 1)

    timeline = simulate(schedule, time_of=time_of)
    assert timeline.busy(1) == 4 * 6 and timeline.busy(0) == 4 * 3
    assert timeline.step_time == 1 + 4 * 6 + 2  # rank 0's first F, rank 1's work, rank 0's last BW
    first = timeline.spans[1][0]
    assert (first.start, first.end, str(first.action)) == (1, 3, "F0s1")


@pytest.mark.parametrize("virtual", [3, 4])
@pytest.mark.parametrize("pp", [2, 4])
def test_interleaved_with_more_stages_per_rank(virtual, pp):
    """Megatron's (PP-1)(F+B)/v of a whole rank is (PP-1)(F+B) in one stage's times."""
    schedule = build_schedule("interleaved_1f1b", pp, 2 * pp, virtual_stages=virtual)
    validate_schedule(schedule, ordered=True)
    assert set(simulate(schedule).bubbles.values()) == {(pp - 1) * 3.0}


def test_a_receive_posted_after_its_send_still_takes_the_rendezvous_time():
    """gloo moves a tensor only once its receive is posted: a receive posted before its send
    returns `comm` after the send; one posted after it still takes `recv` (the round trip)."""
    timeline = simulate(build_schedule("gpipe", 2, 2), Durations(comm=0.1, recv=0.25))
    received = [(s.start, s.end, str(s.action)) for s in timeline.receives[1]]
    assert received == [
        (0, pytest.approx(1.1), "RECV_F0s1<-r0"),  # posted at once, the activation lands at 1 + 0.1
        (pytest.approx(2.1), pytest.approx(2.35), "RECV_F1s1<-r0"),  # sent at 2, posted at 2.1: + 0.25
    ]
    assert [s.start for s in timeline.spans[1][:2]] == [pytest.approx(1.1), pytest.approx(2.35)]
    with pytest.raises(ValueError, match="recv=-1"):
        Durations(recv=-1)


def test_posting_a_send_occupies_the_sender_not_the_message():
    """gloo writes a tensor into the socket in the sender's thread: the sender's next action
    waits `send`; the message leaves when the posting starts."""
    timeline = simulate(build_schedule("gpipe", 2, 2), Durations(send=0.2))
    assert [(s.start, s.end) for s in timeline.spans[0][:2]] == [(0, 1), (pytest.approx(1.2), pytest.approx(2.2))]
    assert timeline.spans[1][0].start == 1
    assert timeline.bubble(0) == pytest.approx(timeline.step_time - 6)  # posting counts as idle, not busy
