"""The simulator's receive look-ahead: which compute action posts each receive (the runtime's rule,
replay.receives_posted_ahead), a hand-computed timeline where a receive posted ahead hides its
rendezvous behind the compute before it, and look-ahead 0 giving the simulator's earlier numbers."""

import pytest

from parallel.pipeline import PIPELINE_SCHEDULES, Durations, build_schedule, simulate
from parallel.pipeline.replay import receives_posted_ahead


def test_receives_are_posted_the_lookahead_th_compute_action_before_the_one_after_them():
    """1F1B pp=2, rank 0: F0 SEND F1 SEND RECV_B0 BW0 F2 SEND RECV_B1 BW1 F3 SEND RECV_B2 BW2 RECV_B3 BW3."""
    actions = build_schedule("1f1b", 2, 4).actions[0]
    assert [str(actions[i]) for i in (4, 8, 12, 14)] == [f"RECV_B{m}s0<-r1" for m in range(4)]
    assert receives_posted_ahead(actions, 0) == {}
    assert receives_posted_ahead(actions, 1) == {4: 2, 8: 6, 12: 10, 14: 13}  # before F1, F2, F3, BW2
    assert receives_posted_ahead(actions, 2) == {4: 0, 8: 5, 12: 9, 14: 10}
    assert receives_posted_ahead(actions, 100) == {4: 0, 8: 0, 12: 0, 14: 0}  # all before the first action
    # rank 1's first receive comes before any compute action: posted with its batch
    assert 0 not in receives_posted_ahead(build_schedule("1f1b", 2, 4).actions[1], 1)
    with pytest.raises(ValueError, match="recv_lookahead=-1: must be >= 0"):
        simulate(build_schedule("1f1b", 2, 4), recv_lookahead=-1)


def _gpipe_slow_last_stage(lookahead: int):
    """GPipe pp=2, 3 micro-batches; rank 0's F takes 1, rank 1's F 2; a message lands 0.1 after
    its send; a receive takes at least 2.5 from its posting (the rendezvous)."""

    def time_of(rank, action):
        return Durations().of(action) * (2 if rank == 1 else 1)

    schedule = build_schedule("gpipe", 2, 3)
    return simulate(schedule, Durations(comm=0.1, recv=2.5), time_of=time_of, recv_lookahead=lookahead)


def test_a_receive_posted_ahead_hides_its_rendezvous_behind_the_compute_before_it():
    """Rank 0 sends micro-batch m's activation at m + 1 (it lands at m + 1.1). Rank 1, as
    (posted, waited from, returned) per receive and (start, end) per forward:
    look-ahead 0: RECV_F0 posted at 0 returns at 2.5 (its rendezvous), F0 2.5-4.5; RECV_F1 is
    posted when F0 ends, long after its send: it pays the whole rendezvous, F1 7-9; so does
    RECV_F2, F2 11.5-13.5.
    look-ahead 1: RECV_F1 is posted before F0 waits (at 0) and is back by F0's end: F1 4.5-6.5;
    RECV_F2 is posted before F1 (at 4.5): of its rendezvous only 2.5 - 2 = 0.5 is left when F1
    ends, F2 7-9."""
    late = _gpipe_slow_last_stage(0)
    assert [(s.start, s.waited_from, s.end) for s in late.receives[1]] == [(0, 0, 2.5), (4.5, 4.5, 7), (9, 9, 11.5)]
    assert [(s.start, s.end) for s in late.spans[1][:3]] == [(2.5, 4.5), (7, 9), (11.5, 13.5)]
    ahead = _gpipe_slow_last_stage(1)
    assert [(s.start, s.waited_from, s.end) for s in ahead.receives[1]] == [(0, 0, 2.5), (0, 4.5, 4.5), (4.5, 6.5, 7)]
    assert [(s.start, s.end) for s in ahead.spans[1][:3]] == [(2.5, 4.5), (4.5, 6.5), (7, 9)]
    # rank 0's gradient receives, posted ahead too, are back before their sends land (+ 0.1)
    assert [(s.start, s.end) for s in ahead.receives[0]] == [(2, pytest.approx(13.1)), (3, 17.1), (15.1, 21.1)]
    assert (late.step_time, ahead.step_time) == (pytest.approx(28.6), pytest.approx(23.1))


@pytest.mark.parametrize("name", PIPELINE_SCHEDULES)
def test_a_receive_posted_ahead_never_returns_later(name):
    """Posting earlier can only let a receive return sooner: every rank's compute starts no
    later, and with free messages the look-ahead changes nothing."""
    schedule = build_schedule(name, 4, 8)
    costs = Durations(comm=0.1, send=0.05, recv=0.3, fb=2.5)
    before = simulate(schedule, costs)
    for lookahead in (1, 2):
        after = simulate(schedule, costs, recv_lookahead=lookahead)
        assert after.recv_lookahead == lookahead
        for rank, spans in after.spans.items():
            assert all(a.start <= b.start + 1e-9 for a, b in zip(spans, before.spans[rank], strict=True))
        free = simulate(schedule, Durations(fb=2.5), recv_lookahead=lookahead)
        assert free.spans == simulate(schedule, Durations(fb=2.5)).spans


@pytest.mark.parametrize(
    ("name", "pp", "microbatches", "step_time", "bubble_share"),
    [
        ("gpipe", 4, 8, 38.5, 0.37662337662337675),
        ("1f1b", 4, 8, 35.85, 0.33054393305439367),
        ("interleaved_1f1b", 2, 8, 53.5, 0.10280373831775665),
        ("zb1p", 4, 8, 29.15, 0.1766723842195544),
        ("dualpipev", 4, 10, 63.75, 0.1392156862745095),
        ("dualpipe", 4, 8, 26.6, 0.15413533834586493),
    ],
)
def test_lookahead_0_gives_the_numbers_of_the_simulator_before_it(name, pp, microbatches, step_time, bubble_share):
    """Step times and idle shares printed by the simulator before the look-ahead existed (session 14's
    code, message costs comm 0.1, send 0.05, recv 0.3, F&B 2.5): the default reproduces them."""
    schedule = build_schedule(name, pp, microbatches)
    timeline = simulate(schedule, Durations(comm=0.1, send=0.05, recv=0.3, fb=2.5))
    assert timeline.step_time == pytest.approx(step_time, rel=1e-12)
    assert timeline.bubble_share == pytest.approx(bubble_share, rel=1e-12)
    assert simulate(schedule, timeline.durations, recv_lookahead=0).spans == timeline.spans


def test_each_ranks_step_end_after_its_last_action_counts_as_idle():
    """GPipe pp=2, 2 micro-batches (F 1, BW 2): rank 0's last BW ends at 9, rank 1's at 7; the
    runtime then waits for its sends and reduces gradients: 0.5 and 3 more."""
    schedule = build_schedule("gpipe", 2, 2)
    timeline = simulate(schedule, finish={0: 0.5, 1: 3.0})
    assert simulate(schedule).ends == {0: 9, 1: 7}
    assert timeline.ends == {0: 9.5, 1: 10} and timeline.step_time == 10
    assert timeline.bubbles == {0: 4, 1: 4}  # 10 - 6 busy each
    with pytest.raises(ValueError, match=r"finish\[1\]=-1: must be >= 0"):
        simulate(schedule, finish={1: -1})
    with pytest.raises(ValueError, match="send=inf: durations must be finite numbers"):
        Durations(send=float("inf"))
