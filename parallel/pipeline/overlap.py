"""Overlapped F&B (DualPipe): one chunk's forward and another chunk's backward run as two
cooperative threads that pass a baton at every expert all-to-all (parallel/all_to_all.py).

Only the side that holds the baton runs; a side gives it up right after posting an all-to-all and
takes it back to wait for it, so one side's all-to-all is in flight while the other computes. The
switch points depend on the model alone, so every rank of a group issues its collectives in the
same order. Each side keeps its own thread-local state (grad mode, saved-tensor hooks, dispatch
modes, activation checkpointing's recompute flag); the baton names sides, not threads, because on
CUDA the backward runs on autograd's device thread. FSDP2's per-unit training state is shared by
both sides for the units both use (the root): `_FsdpSides` gives each side its own copy of it,
and FSDP2's end-of-backward callback (which touches every unit) runs once both sides are done
(FSDP2's private state is reached only through parallel/compat.py's fsdp_* helpers).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from parallel.compat import (
    fsdp_root_state,
    fsdp_state,
    fsdp_training_states,
    hold_fsdp_final_callback,
    run_fsdp_final_callback,
    set_fsdp_training_states,
)

FORWARD, BACKWARD = 0, 1
SIDE_NAMES = ("F", "B")


class _Baton:
    """Which side may run. `trace`, when a list, receives (seconds, side, event) tuples."""

    def __init__(self, on_switch: Callable[[int, int], None], trace: list | None):
        self.cond = threading.Condition()
        self.turn = FORWARD
        self.finished = [False, False]
        self.on_switch, self.trace = on_switch, trace

    def note(self, event: str) -> None:
        if self.trace is not None:
            self.trace.append((time.perf_counter(), SIDE_NAMES[self.turn], event))

    def hand_over(self) -> None:
        """The side holding the baton lets the other run until it posts or finishes."""
        with self.cond:
            me = self.turn
            other = 1 - me
            if self.finished[other]:
                return
            self.on_switch(me, other)
            self.turn = other
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == me)

    def wait_turn(self, side: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == side)

    def finish(self, side: int) -> None:
        with self.cond:
            self.finished[side] = True
            other = 1 - side
            if not self.finished[other]:
                self.on_switch(side, other)
                self.turn = other
                self.cond.notify_all()


_active: _Baton | None = None  # the F&B in progress (one per process: the pipeline runs one at a time)


def hand_over() -> None:
    """Called right after posting a collective: inside an overlapped F&B the other side runs
    until its next post (or its end); outside one this does nothing."""
    if _active is not None:
        _active.hand_over()


def running() -> bool:
    """Whether an overlapped F&B is in progress in this process."""
    return _active is not None


def note(event: str) -> None:
    """Record `event` for the side now running, when the overlap in progress is traced."""
    if _active is not None:
        _active.note(event)


class _FsdpSides:
    """FSDP2 bookkeeping for one overlapped F&B (no-op without FSDP2 units).

    A unit's training state (FORWARD, PRE_BACKWARD, ...) steers its hooks: the root's post-forward
    skips its work while the root is in PRE_BACKWARD, and its reshard frees the weights unless it
    is in FORWARD. The root runs in both sides (each stage call goes through it), so each side
    keeps its own copy of the shared units' states, swapped at every switch. The root's
    end-of-backward callback runs post-backward on every unit and resets them all: run inside the
    backward side it would reshard the forward side's units mid-forward, so it is held back and
    run after both sides, where a forward-then-backward would have run it too."""

    def __init__(self, forward_units: Sequence[nn.Module], backward_units: Sequence[nn.Module]):
        f_states = {id(s): s for s in map(fsdp_state, forward_units) if s is not None}
        b_states = {id(s): s for s in map(fsdp_state, backward_units) if s is not None}
        self.root = fsdp_root_state([*f_states.values(), *b_states.values()])
        shared = {k: s for k, s in f_states.items() if k in b_states}
        if self.root is not None:
            shared[id(self.root)] = self.root
        self.shared = list(shared.values())
        self.views = [fsdp_training_states(self.shared), fsdp_training_states(self.shared)]

    def switch(self, leaving: int, arriving: int) -> None:
        if self.shared:
            self.views[leaving] = fsdp_training_states(self.shared)
            set_fsdp_training_states(self.shared, self.views[arriving])

    def __enter__(self) -> _FsdpSides:
        if self.root is not None:  # nobody queues the callback during the F&B; run below
            hold_fsdp_final_callback(self.root, True)
        return self

    def finish(self, last: int) -> None:
        """Both sides done, `last` ran last: the backward's view of the shared units stands (as
        after a forward then a backward), then the held-back end-of-backward callback runs."""
        if last != BACKWARD:
            self.switch(last, BACKWARD)
        if self.root is not None:
            hold_fsdp_final_callback(self.root, False)
            run_fsdp_final_callback(self.root)

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.root is not None:
            hold_fsdp_final_callback(self.root, False)


class _Helper:
    """One long-lived thread per process for the backward sides: a new thread per F&B would pay
    its start-up and the math libraries' per-thread set-up every time."""

    def __init__(self):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="pipeline-backward", daemon=True).start()

    def _loop(self) -> None:
        while True:
            task, done = self.tasks.get()
            try:
                task()
            finally:
                done.set()

    def start(self, task: Callable[[], None]) -> threading.Event:
        done = threading.Event()
        self.tasks.put((task, done))
        return done


_helper: _Helper | None = None


def run_overlapped(
    forward: Callable[[], None],
    backward: Callable[[], None],
    forward_units: Sequence[nn.Module] = (),
    backward_units: Sequence[nn.Module] = (),
    trace: list | None = None,
) -> None:
    """Run `forward` (in this thread) and `backward` (in a helper thread; it calls
    torch.autograd.backward) interleaved at their all-to-alls. `*_units` are the FSDP2 modules
    each side uses. `trace`, when a list, receives (seconds, side, event) tuples."""
    global _active, _helper
    if _active is not None:
        raise RuntimeError("an overlapped F&B is already running in this process")
    grad_enabled = torch.is_grad_enabled()
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    errors: list[BaseException] = []
    order: list[int] = []  # sides in the order they finished

    with _FsdpSides(forward_units, backward_units) as fsdp:
        baton = _Baton(fsdp.switch, trace)

        def side(run: Callable[[], None], me: int) -> None:
            baton.wait_turn(me)
            try:
                baton.note("start")
                run()
                baton.note("end")
            except BaseException as err:  # re-raised by the caller
                errors.append(err)
            finally:
                order.append(me)
                baton.finish(me)

        def backward_side() -> None:
            if device is not None:
                torch.cuda.set_device(device)  # the current device is per thread
            with torch.set_grad_enabled(grad_enabled):
                side(backward, BACKWARD)

        if _helper is None:
            _helper = _Helper()
        _active = baton
        try:
            backward_done = _helper.start(backward_side)
            side(forward, FORWARD)
            backward_done.wait()
        finally:
            _active = None
        if errors:
            raise errors[0]
        fsdp.finish(order[-1])
