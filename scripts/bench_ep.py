"""Benchmark expert parallelism (CPU, gloo): EP=1 vs 2 vs 4 over the same global tokens, one MoE layer fwd+bwd.
Shows how MoE-layer tokens/s scales with EP, what share of a step the all-to-all takes, and per-rank memory."""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from parallel.memory import local_bytes  # noqa: E402
from scripts.benchlib import print_table, run_ranks, time_collective  # noqa: E402

INIT_STD = 0.02
MIB = 1024 * 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="GLOBAL tokens per step, split evenly over the ranks")
    p.add_argument("--dim", type=int, default=256, help="model hidden size D")
    p.add_argument("--hidden", type=int, default=128, help="expert hidden size H")
    p.add_argument("--experts", type=int, default=16, help="routed experts E")
    p.add_argument("--top-k", type=int, default=4, help="experts per token K")
    p.add_argument("--eps", type=str, default="1,2,4", help="EP sizes to run (world size = EP)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10, help="timed fwd+bwd steps per EP size (median reported)")
    p.add_argument("--rounds", type=int, default=2, help="cycle through all EP sizes this many times (spreads noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repetitions, 1 round: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.dim, args.hidden, args.experts, args.top_k = 512, 64, 32, 8, 2
        args.warmup, args.reps, args.rounds = 1, 2, 1
    args.eps = [int(e) for e in args.eps.split(",")]
    for ep in args.eps:
        if ep < 1 or args.experts % ep or args.tokens % ep:
            p.error(f"EP={ep} must divide --experts ({args.experts}) and --tokens ({args.tokens})")
    return args


# ----------------------------------------------------------------------------- worker


class _Holder(nn.Module):
    """What apply_expert_parallel expects: a model whose moe_layers() yields the MoE modules."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def moe_layers(self) -> list[nn.Module]:
        return [self.moe]


class _A2ATime:
    """Seconds this rank spent inside the dispatcher's all-to-alls since reset()."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fwd = self.bwd = self.counts = 0.0

    @property
    def total(self) -> float:
        return self.fwd + self.bwd + self.counts


def _install_a2a_timers(timer: _A2ATime) -> None:
    """Benchmark-only patches of the names parallel/expert_parallel.py calls:
    - `all_to_all` (token payload, dispatch and combine) becomes an autograd Function that runs
      the exchange (parallel/all_to_all.py: post, wait) timed, and whose backward runs it with
      the splits reversed (what the library's backward does), timed too;
    - `exchange` (the per-expert count exchange) is timed as it is.
    Every timed call includes the wait for the slowest peer, which is what a rank loses."""
    import parallel.expert_parallel as ep_mod
    from parallel.all_to_all import exchange

    class TimedAllToAll(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, out_splits, in_splits, group):
            ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
            t0 = time.perf_counter()
            y = exchange(x, out_splits, in_splits, group)
            timer.fwd += time.perf_counter() - t0
            return y

        @staticmethod
        def backward(ctx, grad_y):
            t0 = time.perf_counter()
            grad_x = exchange(grad_y, ctx.in_splits, ctx.out_splits, ctx.group)
            timer.bwd += time.perf_counter() - t0
            return grad_x, None, None, None

    def timed_payload(x, out_splits, in_splits, group):
        return TimedAllToAll.apply(x, out_splits, in_splits, group)

    def timed_counts(*a, **kw):
        t0 = time.perf_counter()
        try:
            return exchange(*a, **kw)
        finally:
            timer.counts += time.perf_counter() - t0

    ep_mod.all_to_all = timed_payload
    ep_mod.exchange = timed_counts


def _rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _local_tokens(cfg: dict, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of the global batch, identical whatever the world size: the batch is
    made of lcm(EP sizes) chunks, each from its own seed, and a rank generates only its chunks."""
    n_chunks = math.lcm(*cfg["eps"])
    chunk, per_rank = cfg["tokens"] // n_chunks, n_chunks // world
    parts = [
        torch.randn(chunk, cfg["dim"], generator=torch.Generator().manual_seed(1000 * cfg["seed"] + 1 + i))
        for i in range(rank * per_rank, (rank + 1) * per_rank)
    ]
    return torch.cat(parts).unsqueeze(0)  # [1, T_local, D]


def _measure(rank: int, world: int, cfg: dict) -> dict:
    """One EP size on one rank (world = EP); -> this rank's timings, memory and error."""
    from framework.model.args import ModelArgs
    from framework.model.moe.layer import MoE
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.layout import resolve_layout
    from parallel.mesh import build_expert_mesh

    rss_start = _rss_now_mib()
    timer = _A2ATime()
    _install_a2a_timers(timer)

    torch.manual_seed(cfg["seed"])  # the same full layer on every rank, then sliced by EP
    sizes = dict(dim=cfg["dim"], num_experts=cfg["experts"], expert_dim=cfg["hidden"], top_k=cfg["top_k"])
    moe = MoE(ModelArgs(**sizes, num_shared_experts=0))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, INIT_STD)
    moe.train()
    x_local = _local_tokens(cfg, rank, world)
    x_check = x_local[:, :256]
    with torch.no_grad():
        ref_check = moe(x_check)  # full layer, local dispatch: the reference for the EP output

    layout = resolve_layout(world, 1, "auto", -1, world)
    expert_mesh = build_expert_mesh(layout, torch.device("cpu"))
    apply_expert_parallel(_Holder(moe), expert_mesh, ep_per_node=world)

    rows = []
    moe.experts.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))

    def step() -> None:
        for p in moe.parameters():
            p.grad = None
        x = x_local.detach().requires_grad_()
        out = moe(x)
        out.square().mean().backward()

    steps, a2a, fwd, bwd, counts = [], [], [], [], []
    for i in range(cfg["warmup"] + cfg["reps"]):
        timer.reset()
        dt = time_collective(step)
        if i >= cfg["warmup"]:
            steps.append(dt)
            a2a.append(timer.total)
            fwd.append(timer.fwd)
            bwd.append(timer.bwd)
            counts.append(timer.counts)

    # Expert weights are DTensors with their global shape: count only this rank's shard.
    param_bytes = sum(local_bytes(p) for p in moe.parameters())
    grad_bytes = sum(local_bytes(p.grad) for p in moe.parameters())
    expert_params = sum(local_bytes(p) // p.element_size() for p in moe.experts.parameters())
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rows_per_step = rows[-1]
    with torch.no_grad():
        max_err = (moe(x_check) - ref_check).abs().max().item()

    return {
        "steps": steps,
        "share": statistics.median(a / s for a, s in zip(a2a, steps, strict=True)),
        "a2a_ms": 1e3 * statistics.median(a2a),
        "fwd_ms": 1e3 * statistics.median(fwd),
        "bwd_ms": 1e3 * statistics.median(bwd),
        "counts_ms": 1e3 * statistics.median(counts),
        "param_grad_mib": (param_bytes + grad_bytes) / MIB,
        "param_mib": param_bytes / MIB,
        "expert_params": expert_params,
        "peak_rss_mib": peak_rss_mib,
        "rss_start_mib": rss_start,
        "rows": rows_per_step,
        "max_err": max_err,
    }


# ----------------------------------------------------------------------------- parent


def run_ep(ep: int, cfg: dict) -> list[dict]:
    """-> every rank's numbers; one compute thread per rank (up to 4 ranks share 2 cores)."""
    return run_ranks(_measure, ep, cfg, timeout_s=300, threads=1)


def main() -> int:
    args = parse_args()
    cfg = {k: getattr(args, k) for k in ("tokens", "dim", "hidden", "experts", "top_k", "eps", "warmup", "reps")}
    cfg["seed"] = args.seed
    per_ep: dict[int, list[list[dict]]] = {ep: [] for ep in args.eps}
    t_start = time.perf_counter()
    for _ in range(args.rounds):
        for ep in args.eps:
            per_ep[ep].append(run_ep(ep, cfg))
    wall = time.perf_counter() - t_start

    summary = {}
    for ep, rounds in per_ep.items():
        # Step times are synchronised by barriers, so rank 0's are the step's; pool all rounds.
        steps = [s for ranks in rounds for s in ranks[0]["steps"]]
        ranks = [r for rs in rounds for r in rs]
        summary[ep] = {
            "step": statistics.median(steps),
            "share": statistics.mean(r["share"] for r in ranks),
            "share_lo": min(r["share"] for r in ranks),
            "share_hi": max(r["share"] for r in ranks),
            "fwd_ms": statistics.mean(r["fwd_ms"] for r in ranks),
            "bwd_ms": statistics.mean(r["bwd_ms"] for r in ranks),
            "counts_ms": statistics.mean(r["counts_ms"] for r in ranks),
            "param_grad_mib": max(r["param_grad_mib"] for r in ranks),
            "param_mib": max(r["param_mib"] for r in ranks),
            "expert_params": max(r["expert_params"] for r in ranks),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
            "rss_start_mib": statistics.mean(r["rss_start_mib"] for r in ranks),
            "rows_max": max(r["rows"] for r in rounds[0]),
            "rows_mean": statistics.mean(r["rows"] for r in rounds[0]),
            "max_err": max(r["max_err"] for r in ranks),
        }

    base = args.eps[0]
    base_tps = args.tokens / summary[base]["step"]
    print(
        f"# EP scaling of one MoE layer, fwd+bwd fp32, CPU/gloo, torch {torch.__version__}: "
        f"global tokens T={args.tokens} (T/EP per rank), D={args.dim}, E={args.experts}, H={args.hidden}, "
        f"top_k={args.top_k}, no shared experts; {args.warmup} warm-up + {args.reps} timed steps x "
        f"{args.rounds} round(s) per EP (median)"
    )
    print(
        f"# torch.set_num_threads(1) in every rank (up to {max(args.eps)} ranks share {os.cpu_count()} cores); "
        f"ranks > cores is oversubscribed, so read the scaling shape and the all-to-all share, not absolute numbers"
    )
    print()
    header = ["EP", "ranks", "tokens/s (global)", f"vs EP={base}", "all-to-all share"]
    header += ["params+grads MiB per rank", "peak RSS MiB per rank"]
    rows = []
    for ep, s in summary.items():
        tps = args.tokens / s["step"]
        rows.append(
            [ep, ep, f"{tps:,.0f}", f"{tps / base_tps:.2f}x", f"{100 * s['share']:.1f}%"]
            + [f"{s['param_grad_mib']:.2f}", f"{s['peak_rss_mib']:.0f}"]
        )
    print_table(header, rows)
    print()
    for ep, s in summary.items():
        print(
            f"- EP={ep}: step {1e3 * s['step']:.1f} ms; all-to-all per rank fwd {s['fwd_ms']:.1f} ms + "
            f"bwd {s['bwd_ms']:.1f} ms + count exchange {s['counts_ms']:.2f} ms "
            f"(share {100 * s['share_lo']:.1f}-{100 * s['share_hi']:.1f}% over ranks/rounds); "
            f"expert rows per rank max {s['rows_max']} / mean {s['rows_mean']:.0f}; "
            f"expert params per rank {s['expert_params']:,}; params alone {s['param_mib']:.2f} MiB; "
            f"RSS after init {s['rss_start_mib']:.0f} MiB; max |EP out - full-layer out| {s['max_err']:.1e}"
        )
    print(
        "- all-to-all share: time inside the dispatcher's all-to-alls (token payload forward AND backward, plus "
        "the per-expert count exchange), waits for peers included, over the rank's barrier-to-barrier step "
        "time; median over steps, mean over ranks"
    )
    print(f"- total wall time {wall:.0f} s (process spawn and init included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
