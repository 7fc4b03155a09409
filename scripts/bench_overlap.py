"""Benchmark the overlapped F&B (CPU, gloo): dualpipev at pp=2 x ep=2 (4 processes), the same
trainer with parallel.pp_overlap off and on, step by step in turn; step time, all-to-all time in
flight and exposed (ranks blocked waiting for it), its share of the step, and the share hidden.
Exposed time is also split by where it is waited for: inside an F&B action (the chunk pairs the
overlap can hide) or elsewhere (the warm-up forwards and cool-down backwards, which have nothing to
run beside them: the more micro-batches per step, the smaller their share).
`--quick` runs a tiny model for one step per mode (the smoke test in tests/scripts/test_benchmarks.py).

Every rank runs the real trainer's pipelined forward_backward_step; the runtime switches between
F then B and the overlapped F&B per step (`PipelineRuntime.overlap`), so both modes see the same
model, data sizes and machine load. The all-to-all times are the runtime's per-step record
(parallel/all_to_all.py TIMES), per rank; the table shows their mean over ranks.
"""

from __future__ import annotations

import argparse
import os
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
from scripts.benchlib import print_table, rotated, run_ranks  # noqa: E402

MODES = ("off", "on")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--microbatches", type=int, default=6, help="micro-batches per step and data-parallel rank")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="blocks (the first dense, the rest MoE)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 timed step per mode: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.dim, args.layers, args.seq_len, args.micro_batch_size = 32, 3, 16, 1
        args.microbatches, args.warmup, args.steps = 3, 0, 1
    if args.microbatches < 3:
        p.error(f"--microbatches={args.microbatches}: dualpipev at pp=2 needs >= 3")
    return args


def config_yaml(args: argparse.Namespace, run_dir: str) -> str:
    heads = max(2, args.dim // 32)
    dotlist = [
        f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={heads}",
        f"model.n_kv_heads={heads // 2}", "model.vocab_size=256", f"model.seq_len={args.seq_len}",
        f"model.ffn_dim={2 * args.dim}", "model.num_experts=8", "model.num_shared_experts=1", "model.top_k=2",
        f"model.expert_dim={args.dim // 2}", "model.first_k_dense=1", "model.mtp_depth=1",
        f"train.global_batch_size={2 * args.microbatches * args.micro_batch_size}",
        f"train.micro_batch_size={args.micro_batch_size}", "train.device=cpu",
        "parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.ep=2",
        "data.source=synthetic", "data.synthetic_tokens=400000", "logging.wandb.mode=disabled",
    ]  # fmt: skip
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(dotlist))
    cfg.launcher.nproc_per_node, cfg.run_dir = 4, run_dir
    return OmegaConf.to_yaml(cfg)


def _record_waits(waits: list[tuple[float, float]]) -> None:
    """Record each all-to-all wait's (begin, end) in this process, beside TIMES' totals."""
    from parallel import all_to_all

    wait = all_to_all._Posted.wait

    def timed_wait(self) -> None:
        begin = time.perf_counter()
        wait(self)
        waits.append((begin, time.perf_counter()))

    all_to_all._Posted.wait = timed_wait


def _in_spans(waits: list[tuple[float, float]], spans: list[tuple[float, float]]) -> float:
    """Seconds of the waits that lie inside one of the spans."""
    return sum(min(e, end) - max(b, start) for b, e in waits for start, end in spans if b < end and e > start)


def _measure(rank: int, world: int, cfg_yaml: str, warmup: int, steps: int) -> dict:
    """-> per mode, per timed step: this rank's step seconds (from a barrier to its return) and
    its all-to-all seconds in flight and exposed, and the part of the exposed inside F&B actions."""
    from framework.distributed import DistContext
    from framework.train import Trainer
    from parallel.all_to_all import TIMES
    from parallel.pipeline.actions import Kind

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    waits: list[tuple[float, float]] = []
    _record_waits(waits)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for turn in range(warmup + steps):
        for mode in rotated(MODES, turn):  # alternate, so drift and load hit both modes alike
            trainer.pipeline.overlap = mode == "on"
            batches = trainer.loader.next_step()
            dist.barrier()
            TIMES.reset()
            waits.clear()
            trainer.pipeline.timings = []
            start = time.perf_counter()
            trainer.forward_backward_step(batches)
            seconds = time.perf_counter() - start
            a2a = TIMES.snapshot()
            fb = [(t[1], t[2]) for t in trainer.pipeline.timings if len(t) == 3 and t[0].kind is Kind.FB]
            trainer.pipeline.timings = None
            trainer.optimizer.zero_grad(set_to_none=True)
            if turn >= warmup:
                results[mode].append(
                    {
                        "step": seconds,
                        "exposed": a2a.exposed_s,
                        "in_flight": a2a.in_flight_s,
                        "n": a2a.count,
                        "ready": a2a.ready,
                        "in_overlap": a2a.in_overlap,
                        "exposed_fb": _in_spans(waits, fb),
                    }
                )
    return results


def main() -> None:
    args = parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"# overlapped F&B, dualpipev pp=2 x ep=2, CPU/gloo, 4 processes x 1 thread, {cores} cores on this machine")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"model: dim {args.dim}, {args.layers} blocks (1 dense, MoE 8 experts top-2, 1 shared), MTP 1, "
        f"seq {args.seq_len}; {args.microbatches} micro-batches of {args.micro_batch_size} per step and "
        f"data-parallel rank; {args.warmup} warm-up + {args.steps} timed steps per mode, in turn"
    )
    with tempfile.TemporaryDirectory() as tmp:
        per_rank = run_ranks(_measure, 4, config_yaml(args, tmp), args.warmup, args.steps, timeout_s=1800)
    rows, exposed_off, exposed_fb_off = [], 0.0, 0.0
    for mode in MODES:
        # a step lasts as long as its slowest rank; all-to-all times are per rank, averaged
        step = statistics.fmean(max(r[mode][i]["step"] for r in per_rank) for i in range(args.steps))
        exposed = statistics.fmean(x["exposed"] for r in per_rank for x in r[mode])
        exposed_fb = statistics.fmean(x["exposed_fb"] for r in per_rank for x in r[mode])
        in_flight = statistics.fmean(x["in_flight"] for r in per_rank for x in r[mode])
        count = statistics.fmean(x["n"] for r in per_rank for x in r[mode])
        in_overlap = statistics.fmean(x["in_overlap"] for r in per_rank for x in r[mode])
        ready = statistics.fmean(x["ready"] / x["n"] for r in per_rank for x in r[mode] if x["n"])
        if mode == "off":
            exposed_off, exposed_fb_off = exposed, exposed_fb
        hidden = f"{100 * (1 - exposed / exposed_off):.0f}" if mode == "on" and exposed_off else "-"
        hidden_fb = f"{100 * (1 - exposed_fb / exposed_fb_off):.0f}" if mode == "on" and exposed_fb_off else "-"
        rows.append(
            [
                mode,
                f"{1e3 * step:.0f}",
                f"{count:.0f}",
                f"{in_overlap:.0f}",
                f"{1e3 * in_flight:.1f}",
                f"{1e3 * exposed:.1f}",
                f"{100 * exposed / step:.1f}",
                f"{100 * ready:.0f}",
                hidden,
                f"{1e3 * exposed_fb:.1f}",
                f"{1e3 * (exposed - exposed_fb):.1f}",
                hidden_fb,
            ]
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    header = ["pp_overlap", "step ms", "all-to-alls", "in F&B", "in flight ms", "exposed ms", "exposed % of step"]
    split = ["exposed in F&B ms", "exposed elsewhere ms", "hidden in F&B %"]
    print_table([*header, "done before wait %", "hidden % (vs off)", *split], rows, left=1)
    print()
    print("per rank and step, mean over ranks. in F&B: all-to-alls waited for inside an overlapped F&B (the")
    print("other side ran meanwhile). in flight: from posting an all-to-all to the end of its wait. exposed:")
    print("time blocked waiting for all-to-alls (for the data, for a slow peer to post too, for this thread")
    print("to wake up); with pp_overlap off that is the all-to-all time. done before wait: all-to-alls already")
    print("complete when waited for (fully hidden).")
    print("hidden: 1 - exposed(on) / exposed(off). exposed in F&B / elsewhere: waited for inside an F&B action")
    print("(what the overlap can hide; with it off, the same chunk pairs run one after the other) or in the")
    print("other actions (warm-up forwards, cool-down backwards); hidden in F&B: 1 - in F&B(on) / in F&B(off).")


if __name__ == "__main__":
    main()
