"""Benchmark pipeline schedules (CPU, gloo): the same model and global batch at pp=2 and pp=4, each
runnable schedule; measured step time, bubble share per rank from per-action timestamps, and the
simulator's prediction from the measured per-action times.

Every rank runs the real trainer's pipelined forward_backward_step with the runtime's timing hook
on (parallel/pipeline/runtime.py). A rank's bubble is the part of the step window (the barrier
before the step to the last rank's end) it spends outside compute actions: waiting for a peer's
activation or gradient, plus the pipeline's fill and drain. The simulator (parallel/pipeline/
simulate.py) replays the same action lists with each rank's measured mean time per action
(per kind and stage), no message latency: measured/predicted > 1 is what the runtime adds (or,
with more ranks than cores, the time-sharing the simulator does not model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from framework.config import Config  # noqa: E402
from parallel.pipeline import build_schedule, simulate  # noqa: E402
from parallel.pipeline.actions import Action, Kind  # noqa: E402
from scripts.benchlib import print_table, run_ranks  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb1p", "dualpipev")  # dualpipe: two copies, not run yet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pps", type=str, default="2,4", help="pipeline sizes to run (world size = pp)")
    p.add_argument("--schedules", type=str, default=",".join(SCHEDULES))
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (global batch, micro 1)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=8, help="blocks (dualpipev at pp=4 cuts 8 stages)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per schedule (mean step and action times)")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 timed step: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.dim, args.layers, args.seq_len, args.warmup, args.steps = 32, 6, 16, 0, 1
    args.pps = [int(x) for x in args.pps.split(",")]
    args.schedules = args.schedules.split(",")
    for name in args.schedules:
        if name not in SCHEDULES:
            p.error(f"--schedules: {name!r}: allowed: {', '.join(SCHEDULES)}")
    return args


def model_overrides(args: argparse.Namespace) -> list[str]:
    heads = max(2, args.dim // 32)
    return [
        f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={heads}",
        f"model.n_kv_heads={heads // 2}", "model.vocab_size=256", f"model.seq_len={args.seq_len}",
        f"model.ffn_dim={2 * args.dim}", "model.num_experts=8", "model.num_shared_experts=1", "model.top_k=2",
        f"model.expert_dim={args.dim // 2}", "model.first_k_dense=1", "model.mtp_depth=1",
        f"train.global_batch_size={args.microbatches}", "train.micro_batch_size=1",
        "data.source=synthetic", "data.synthetic_tokens=200000", "logging.wandb.mode=disabled",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- worker


def _measure(rank: int, world: int, cfg_yamls: dict[str, str], warmup: int, steps: int) -> dict:
    """Each schedule in turn on this rank; -> per schedule and timed step: the step window
    (after a barrier, until this rank's step returned) and this rank's (start, end) per compute
    action, in its action-list order."""
    from framework.distributed import DistContext
    from framework.train import Trainer

    results = {}
    for name, cfg_yaml in cfg_yamls.items():
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
        trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
        runs = []
        for i in range(warmup + steps):
            batches = trainer.loader.next_step()
            trainer.pipeline.timings = []
            dist.barrier()
            start = time.perf_counter()
            trainer.forward_backward_step(batches)
            end = time.perf_counter()
            trainer.optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                runs.append({"start": start, "end": end, "spans": [(s, e) for _, s, e in trainer.pipeline.timings]})
        trainer.pipeline.timings = None
        results[name] = runs
    return results


# ----------------------------------------------------------------------------- analysis


def signature(action: Action) -> tuple:
    """Actions timed alike: same kind on the same stage(s)."""
    return (action.kind, *((p.kind, p.stage) for p in action.parts()))


def analyse(name: str, pp: int, microbatches: int, per_rank: list[dict]) -> dict:
    schedule = build_schedule(name, pp, microbatches)
    compute = {r: schedule.compute_actions(r) for r in range(pp)}
    steps = len(per_rank[0][name])
    windows, bubbles = [], {r: [] for r in range(pp)}
    durations: dict[tuple[int, tuple], list[float]] = {}
    kind_times: dict[str, list[float]] = {"F": [], "B": [], "W": [], "F&B": []}
    for step in range(steps):
        runs = [per_rank[r][name][step] for r in range(pp)]
        t0, t1 = max(run["start"] for run in runs), max(run["end"] for run in runs)
        windows.append(t1 - t0)
        for r, run in enumerate(runs):
            assert len(run["spans"]) == len(compute[r]), (name, r)
            busy = 0.0
            for action, (s, e) in zip(compute[r], run["spans"], strict=True):
                busy += e - s
                durations.setdefault((r, signature(action)), []).append(e - s)
                kind = "B" if action.kind in (Kind.B, Kind.BW) else str(action.kind)
                kind_times[kind].append(e - s)
            bubbles[r].append(1 - busy / (t1 - t0))
    mean = {key: statistics.fmean(v) for key, v in durations.items()}
    predicted = simulate(schedule, time_of=lambda rank, action: mean[(rank, signature(action))])
    measured_share = [statistics.fmean(bubbles[r]) for r in range(pp)]
    predicted_share = [predicted.bubble(r) / predicted.step_time for r in range(pp)]
    return {
        "step_ms": 1e3 * statistics.fmean(windows),  # the mean, as the simulator's times are
        "predicted_ms": 1e3 * predicted.step_time,
        "measured": measured_share,
        "predicted": predicted_share,
        "kind_ms": {k: 1e3 * statistics.fmean(v) if v else 0.0 for k, v in kind_times.items()},
    }


def main() -> None:
    args = parse_args()
    cores = len(__import__("os").sched_getaffinity(0))
    print(f"# pipeline schedules, CPU/gloo, 1 thread per rank, {cores} cores on this machine")
    print(
        f"model: dim {args.dim}, {args.layers} blocks (1 dense, MoE 8 experts top-2, 1 shared), MTP 1, "
        f"seq {args.seq_len}; global batch {args.microbatches} sequences = {args.microbatches} micro-batches of 1; "
        f"{args.warmup} warm-up + {args.steps} timed steps per schedule"
    )
    print("B runs the whole backward (W is empty) and F&B runs F then B: no overlap, no B/W split yet.")
    rows, kinds = [], []
    for pp in args.pps:
        if pp > cores:
            print(f"pp={pp}: {pp} processes on {cores} cores: oversubscribed, ranks time-share the cores")
        with tempfile.TemporaryDirectory() as tmp:
            cfgs = {}
            for name in args.schedules:
                dotlist = model_overrides(args) + [f"parallel.pp={pp}", f"parallel.pp_schedule={name}"]
                cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(dotlist))
                cfg.launcher.nproc_per_node, cfg.run_dir = pp, str(Path(tmp) / name)
                cfgs[name] = OmegaConf.to_yaml(cfg)
            per_rank = run_ranks(_measure, pp, cfgs, args.warmup, args.steps, timeout_s=1800)
        for name in args.schedules:
            a = analyse(name, pp, args.microbatches, per_rank)
            measured, predicted = statistics.fmean(a["measured"]), statistics.fmean(a["predicted"])
            rows.append(
                [
                    name,
                    pp,
                    f"{a['step_ms']:.0f}",
                    " / ".join(f"{100 * b:.0f}" for b in a["measured"]),
                    f"{100 * measured:.1f}",
                    f"{a['predicted_ms']:.0f}",
                    " / ".join(f"{100 * b:.0f}" for b in a["predicted"]),
                    f"{100 * predicted:.1f}",
                    f"{measured / predicted:.2f}" if predicted > 0 else "n/a",
                ]
            )
            k = a["kind_ms"]
            kinds.append([name, pp, *(f"{k[x]:.1f}" if k[x] else "-" for x in ("F", "B", "W", "F&B"))])
    print()
    header = ["schedule", "pp", "step ms", "bubble % per rank", "bubble %", "sim step ms"]
    header += ["sim bubble % per rank", "sim bubble %", "measured/sim bubble"]
    print_table(header, rows, left=1)
    print()
    print("mean measured time per action (ms; B includes the weight gradients, W does nothing):")
    print_table(["schedule", "pp", "F", "B", "W", "F&B"], kinds, left=1)


if __name__ == "__main__":
    main()
