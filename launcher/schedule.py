"""`moe-launch schedule`: build a pipeline schedule, simulate it, and print its timeline (one row
per rank, one column per time unit) with step time and bubbles, or draw it to a PNG."""

from __future__ import annotations

import argparse
import math
import sys

from parallel.pipeline import PIPELINE_SCHEDULES, Durations, Kind, Timeline, build_schedule, simulate
from parallel.pipeline.schedules import published_bubble

DESCRIPTION = """\
Print a pipeline schedule's timeline as simulated from per-action times, with the step time and
each rank's bubble (idle time in the step). Nothing runs: the schedule is data.

Times are per stage and micro-batch, in any unit: --f forward, --b input-gradient backward,
--w weight-gradient backward (a full backward takes b + w; the published formulas call that B),
--fb one F&B (a forward overlapped with a full backward; default f + b + w, no overlap gain).
The published bubble is printed for comparison; zb1p's and DualPipe's formulas assume
f = b = w, and DualPipe's also b + w <= F&B <= f + b + w.

Messages (default free): --comm, a message's latency from the send's posting to a receiver
waiting for it; --send, the time posting a send occupies the sender; --recv, the least time a
receive takes from its posting (gloo's rendezvous: it moves a tensor only once its receive is
posted); --recv-lookahead N posts each receive N compute actions early, as the runtime does on
gloo (MOE_PP_RECV_LOOKAHEAD, default 1 there; 0: with its batch), so its --recv runs while the
rank computes. scripts/bench_pipeline.py measures all four on a real run.

examples:
  moe-launch schedule --schedule dualpipev --pp 4 --microbatches 10
  moe-launch schedule --schedule 1f1b --pp 4 --microbatches 8 --f 1 --b 1 --w 1
  moe-launch schedule --schedule dualpipe --pp 4 --microbatches 8 --fb 2.5 --png dualpipe.png
  moe-launch schedule --schedule 1f1b --pp 2 --microbatches 4 --comm 0.05 --send 0.05 --recv 0.3 --recv-lookahead 1
"""

LEGEND = (
    "F forward, B input-gradient backward, W weight-gradient backward, BW full backward, "
    "FxBy F&B (forward of x overlapped with backward of y), . idle; upper case: the rank's first "
    "stage, lower case: its other stage (V-shape, reverse DualPipe copy, interleaved chunks)"
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "schedule",
        help="print or draw a simulated pipeline schedule",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--schedule",
        required=True,
        choices=PIPELINE_SCHEDULES,
        metavar="NAME",
        help=f"one of {', '.join(PIPELINE_SCHEDULES)}",
    )
    parser.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    parser.add_argument("--microbatches", type=int, required=True, help="micro-batches per step")
    parser.add_argument("--virtual-stages", type=int, default=2, help="stages per rank for interleaved_1f1b")
    parser.add_argument("--f", type=float, default=1.0, help="forward time (default 1)")
    parser.add_argument("--b", type=float, default=1.0, help="input-gradient backward time (default 1)")
    parser.add_argument("--w", type=float, default=1.0, help="weight-gradient backward time (default 1)")
    parser.add_argument("--fb", type=float, default=None, help="F&B time (default f + b + w)")
    parser.add_argument("--comm", type=float, default=0.0, help="point-to-point latency per message (default 0)")
    parser.add_argument("--send", type=float, default=0.0, help="time posting a send takes the sender (default 0)")
    parser.add_argument("--recv", type=float, default=0.0, help="least time of a receive from its posting (default 0)")
    parser.add_argument(
        "--recv-lookahead",
        type=int,
        default=0,
        metavar="N",
        help="post each receive N compute actions early, as the runtime does on gloo (default 0: with its batch)",
    )
    parser.add_argument("--scale", type=int, default=None, help="characters per time unit (default: fits labels)")
    parser.add_argument("--png", metavar="FILE", default=None, help="also draw the timeline to this PNG file")
    return parser


def _phase(timeline: Timeline, rank: int, action) -> int:
    """0 for the rank's first stage, 1 for any other it holds."""
    first = timeline.schedule.stages_of(rank)[0]
    return 0 if (action.direction, action.stage) == first else 1


def _label(timeline: Timeline, rank: int, action) -> str:
    def code(part, letters: str) -> str:
        return letters if _phase(timeline, rank, part) == 0 else letters.lower()

    if action.kind is Kind.FB:
        back = action.backward
        return f"{code(action, 'F')}{action.microbatch}{code(back, 'B')}{back.microbatch}"
    return f"{code(action, str(action.kind))}{action.microbatch}"


def _default_scale(timeline: Timeline) -> int:
    """Enough characters per time unit that the shortest action shows its micro-batch number."""
    shortest = min(
        (s.end - s.start for spans in timeline.spans.values() for s in spans if s.end > s.start), default=1.0
    )
    digits = len(str(timeline.schedule.microbatches - 1))
    return max(1, min(4, math.ceil((1 + digits) / shortest)))


def render_text(timeline: Timeline, scale: int | None = None) -> str:
    """One row per rank, `scale` characters per time unit; each action shows its label when it
    fits (else its letters), idle time is '.'."""
    scale = scale or _default_scale(timeline)
    width = math.ceil(timeline.step_time * scale - 1e-9)
    lines = []
    for rank, spans in timeline.spans.items():
        row = ["."] * width
        for span in spans:
            start, end = round(span.start * scale), round(span.end * scale)
            if end <= start:
                continue
            label = _label(timeline, rank, span.action)
            if len(label) > end - start:
                label = "".join(c for c in label if not c.isdigit())[: end - start]
            row[start:end] = label.ljust(end - start)
        lines.append(f"rank {rank:<2}|{''.join(row)}|")
    return "\n".join(lines)


def summary(timeline: Timeline) -> str:
    d, s = timeline.durations, timeline.schedule
    fb = d.f + d.b + d.w if d.fb is None else d.fb
    lines = [f"step time {timeline.step_time:g}; bubble (idle) per rank:"]
    for rank, bubble in timeline.bubbles.items():
        share = bubble / timeline.step_time if timeline.step_time else 0.0
        lines.append(f"  rank {rank}: {bubble:g} ({share:.1%})")
    worst = max(timeline.bubbles.values())
    lines.append(f"max bubble {worst:g}; idle share of all ranks {timeline.bubble_share:.1%}")
    formula, value = published_bubble(s.name, s.pp, d.f, d.b, d.w, fb)
    lines.append(f"published bubble {formula} = {value:g} (B = b + w = {d.b + d.w:g})")
    return "\n".join(lines)


def render_png(timeline: Timeline, path: str) -> None:
    """Draw the timeline: one row per rank, one colour per action kind, lighter for the rank's
    other stage, micro-batch numbers inside the bars where they fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = {Kind.F: "#4c78a8", Kind.B: "#f58518", Kind.W: "#54a24b", Kind.BW: "#e45756", Kind.FB: "#b279a2"}
    light = {Kind.F: "#9ecae9", Kind.B: "#ffbf79", Kind.W: "#88d27a", Kind.BW: "#ff9d98", Kind.FB: "#d6a5c9"}
    ranks = len(timeline.spans)
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, timeline.step_time * 0.25)), 0.5 * ranks + 1.2))
    for rank, spans in timeline.spans.items():
        for span in spans:
            palette = colours if _phase(timeline, rank, span.action) == 0 else light
            ax.broken_barh(
                [(span.start, span.end - span.start)],
                (rank - 0.4, 0.8),
                facecolors=palette[span.action.kind],
                edgecolor="black",
                linewidth=0.4,
            )
            if span.end - span.start >= 0.6:
                ax.text(
                    (span.start + span.end) / 2,
                    rank,
                    _label(timeline, rank, span.action),
                    ha="center",
                    va="center",
                    fontsize=6,
                )
    s = timeline.schedule
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, timeline.step_time)
    ax.set_xlabel("time")
    ax.set_title(
        f"{s.name}: pp={s.pp}, {s.microbatches} micro-batches; step {timeline.step_time:g}, "
        f"idle {timeline.bubble_share:.1%}"
    )
    handles = [Patch(facecolor=colours[k], label=str(k)) for k in colours]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(handles), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _messages(durations: Durations, lookahead: int) -> str:
    """The message costs beyond comm, when any is set (the header stays as it was without them)."""
    if not (durations.send or durations.recv or lookahead):
        return ""
    ahead = f"{lookahead} compute action{'s' if lookahead != 1 else ''} ahead" if lookahead else "with their batch"
    return f" send={durations.send:g} recv={durations.recv:g}; receives posted {ahead}"


def run(args: argparse.Namespace) -> int:
    """The `schedule` command; bad sizes or times end with one line and exit code 2."""
    try:
        schedule = build_schedule(args.schedule, args.pp, args.microbatches, args.virtual_stages)
        durations = Durations(f=args.f, b=args.b, w=args.w, fb=args.fb, comm=args.comm, send=args.send, recv=args.recv)
        if args.scale is not None and args.scale < 1:
            raise ValueError(f"--scale={args.scale}: must be >= 1")
        if args.recv_lookahead < 0:
            raise ValueError(f"--recv-lookahead={args.recv_lookahead}: must be >= 0 (compute actions ahead)")
    except ValueError as err:
        print(f"moe-launch: error: {err}", file=sys.stderr)
        return 2
    timeline = simulate(schedule, durations, recv_lookahead=args.recv_lookahead)
    fb = durations.f + durations.b + durations.w if durations.fb is None else durations.fb
    overlap = f" F&B={fb:g}" if schedule.name in ("dualpipe", "dualpipev") else ""
    print(
        f"{schedule.name}: pp={schedule.pp}, {schedule.microbatches} micro-batches, {schedule.num_stages} stages"
        f"{' per copy' if schedule.directions == 2 else ''}; F={durations.f:g} B={durations.b:g} "
        f"W={durations.w:g}{overlap} comm={durations.comm:g}{_messages(durations, args.recv_lookahead)}"
    )
    print(render_text(timeline, args.scale))
    print(LEGEND)
    print(summary(timeline))
    if args.png:
        try:
            render_png(timeline, args.png)
        except ImportError:
            print("moe-launch: error: --png needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
        except OSError as err:
            print(f"moe-launch: error: --png {args.png}: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"wrote {args.png}")
    return 0
