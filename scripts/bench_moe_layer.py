"""Benchmark the MoE layer (fp32, CPU): ours vs a naive per-expert loop vs DeepSpeed's MoE, plus expert GEMM GFLOP/s.
Checks the issue's goals: our layer >= 2x DeepSpeed's tokens/s, expert grouped GEMMs >= 80% of the dense-matmul rate."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import framework.model.moe.experts as experts_mod  # noqa: E402
from framework.distributed import free_port  # noqa: E402
from framework.model.args import ModelArgs  # noqa: E402
from framework.model.ffn import SwiGLU  # noqa: E402
from framework.model.moe.grouped_gemm import grouped_mm, grouped_mm_supported, looped_mm  # noqa: E402
from framework.model.moe.layer import MoE  # noqa: E402
from framework.model.moe.router import Router  # noqa: E402
from scripts.benchlib import print_table, time_side_by_side  # noqa: E402

INIT_STD = 0.02


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512, help="model hidden size D")
    p.add_argument("--hidden", type=int, default=256, help="expert hidden size H")
    p.add_argument("--experts", type=int, default=16, help="routed experts E")
    p.add_argument("--top-k", type=int, default=4, help="experts per token K")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed variant")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.dim, args.hidden, args.experts, args.top_k = 2, 64, 64, 32, 4, 2
        args.warmup, args.reps = 1, 1
    return args


# ----------------------------------------------------------------------------- models


class NaiveMoE(nn.Module):
    """The classic naive MoE: same router, then a python loop over experts, each gathering its
    tokens, running its SwiGLU and scattering the gate-weighted result back with index_add_."""

    def __init__(self, router: Router, experts: list[SwiGLU]):
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD)
        out_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(routing.topk_idx_TK == e)
            if tok.numel() == 0:
                continue
            y = expert(x_TD[tok]) * routing.topk_weights_TK[tok, slot].unsqueeze(-1)
            out_TD.index_add_(0, tok, y.to(out_TD.dtype))
        return out_TD.view(B, S, D)


def swiglu_from_grouped(ours: MoE, e: int) -> SwiGLU:
    """A SwiGLU holding expert e's weights (nn.Linear stores the transpose of our [D, H] blocks)."""
    ex = ours.experts
    D, H = ex.w1.shape[1], ex.w1.shape[2]
    m = SwiGLU(D, H)
    with torch.no_grad():
        m.w1.weight.copy_(ex.w1[e].t())
        m.w3.weight.copy_(ex.w3[e].t())
        m.w2.weight.copy_(ex.w2[e].t())
    return m


@contextlib.contextmanager
def experts_use(mm: Callable) -> Iterator[None]:
    """Run GroupedExperts with another GEMM (e.g. looped_mm) without touching the module's code."""
    saved = experts_mod.grouped_mm
    experts_mod.grouped_mm = mm
    try:
        yield
    finally:
        experts_mod.grouped_mm = saved


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Silence stdout/stderr at the fd level (DeepSpeed's setup chatter, incl. C++ prints);
    replay the captured text if the block raises."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:  # the block raised: show what it printed
                f.seek(0)
                sys.stderr.write(f.read().decode(errors="replace"))


def build_deepspeed(ours: MoE, D: int, H: int, E: int, K: int):
    """DeepSpeed's MoE (ep_size=1, dropless) with our SwiGLU as the expert and our weights copied in.
    DeepSpeed needs torch.distributed + its comm backend + its expert groups even for one process."""
    import torch.distributed as tdist

    with quiet_fds():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(k, v)
        if not tdist.is_initialized():
            tdist.init_process_group("gloo", rank=0, world_size=1)
        import deepspeed
        from deepspeed.moe.layer import MoE as DeepSpeedMoE

        deepspeed.init_distributed(dist_backend="gloo")  # adopts the group above as DeepSpeed's backend
        ds = DeepSpeedMoE(
            hidden_size=D,
            expert=SwiGLU(D, H),
            num_experts=E,
            ep_size=1,
            k=K,
            drop_tokens=False,  # capacity = the busiest expert's count each step: nothing is dropped
            use_rts=False,
            top2_2nd_expert_sampling=False,  # k=2 path only: no Gumbel noise on the 2nd choice
        )
        ds.set_deepspeed_parallelism()  # creates the ep_size_1 expert/data groups, sets the gate's group
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(swiglu_from_grouped(ours, e).state_dict())
    return ds, deepspeed.__version__


def deepspeed_route_stats(ds, x_BSD: torch.Tensor) -> tuple[int, int, int]:
    """-> (dropped (token, slot) routes, capacity per expert, padded rows E*C) for this input."""
    x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
    with torch.no_grad():
        _, C, E, indices_KT, _, _, _ = ds.deepspeed_moe.gate(x_TD, None, True)
    C = int(C)
    return int((indices_KT < 0).sum()), C, E * C


# ----------------------------------------------------------------------------- timing


def fwd_bwd_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(dy)

    return step


def gemm_step(mm: Callable, x_ND, h_NF, w1, w3, w2, offsets, grads) -> Callable[[], None]:
    """Forward+backward of the three expert GEMMs of GroupedExperts (x@w1, x@w3, h@w2)."""
    leaves = (x_ND, h_NF, w1, w3, w2)

    def step() -> None:
        for t in leaves:
            t.grad = None
        outs = (mm(x_ND, w1, offsets), mm(x_ND, w3, offsets), mm(h_NF, w2, offsets))
        torch.autograd.backward(outs, grads)

    return step


def dense_step(a, b, dy) -> Callable[[], None]:
    def step() -> None:
        a.grad = b.grad = None
        torch.matmul(a, b).backward(dy)

    return step


def dense3_step(x_ND, h_NF, w1, w3, w2, grads) -> Callable[[], None]:
    def step() -> None:
        for t in (x_ND, h_NF, w1, w3, w2):
            t.grad = None
        torch.autograd.backward((x_ND @ w1, x_ND @ w3, h_NF @ w2), grads)

    return step


def med_ms(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


# ----------------------------------------------------------------------------- main


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    B, S, D, H, E, K = args.batch, args.seq, args.dim, args.hidden, args.experts, args.top_k
    T, N = B * S, B * S * args.top_k

    # --- models, all with the same weights (DeepSpeed: same expert weights, its own softmax gating)
    moe_args = ModelArgs(dim=D, num_experts=E, expert_dim=H, top_k=K, num_shared_experts=0)
    ours = MoE(moe_args)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, INIT_STD)
    ours.train()
    naive_router = Router(moe_args)
    naive_router.load_state_dict(ours.router.state_dict())
    naive = NaiveMoE(naive_router, [swiglu_from_grouped(ours, e) for e in range(E)]).train()

    ds, ds_version, ds_error = None, None, "skipped (--no-deepspeed)"
    if not args.no_deepspeed:
        try:
            ds, ds_version = build_deepspeed(ours, D, H, E, K)
            ds.train()
        except Exception as exc:  # report it, keep benchmarking the rest
            ds_error = f"{type(exc).__name__}: {exc}"

    x = torch.randn(B, S, D, requires_grad=True)
    dy = torch.randn(B, S, D)
    load_start = os.getloadavg()[0]

    # --- sanity: same routing and weights -> naive and looped must match ours
    with torch.no_grad():
        ref = ours(x)
        naive_err = (naive(x) - ref).abs().max().item()
        with experts_use(looped_mm):
            looped_err = (ours(x) - ref).abs().max().item()
    ours.tokens_per_expert.zero_()

    # --- 1. the layer, forward + backward
    ours_step = fwd_bwd_step(ours, x, dy)

    def ours_looped_step() -> None:
        with experts_use(looped_mm):
            ours_step()

    layer_fns = {
        "ours (grouped GEMM, dropless)": ours_step,
        "ours, experts via looped_mm": ours_looped_step,
        "naive (loop over experts, index_add_)": fwd_bwd_step(naive, x, dy),
    }
    if ds is not None:
        layer_fns["DeepSpeed MoE (ep=1, drop_tokens=False)"] = fwd_bwd_step(ds, x, dy)
    layer_t = time_side_by_side(layer_fns, args.warmup, args.reps)

    # --- 2. expert GEMMs alone, on the router's real per-expert counts
    with torch.no_grad():
        tokens_per_expert = torch.bincount(ours.router(x.reshape(T, D)).topk_idx_TK.reshape(-1), minlength=E)
    offsets = torch.cumsum(tokens_per_expert, 0)

    def leaf(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) * INIT_STD).requires_grad_(True)

    x_ND, h_NF = leaf(N, D), leaf(N, H)
    w1, w3, w2 = leaf(E, D, H), leaf(E, D, H), leaf(E, H, D)
    g_grads = (torch.randn(N, H), torch.randn(N, H), torch.randn(N, D))
    d1, d3, d2 = leaf(D, H), leaf(D, H), leaf(H, D)
    a_ND, b_D3H = leaf(N, D), leaf(D, 3 * H)
    gemm_fns = {
        "dense: one matmul [N,D]@[D,3H] (reference)": dense_step(a_ND, b_D3H, torch.randn(N, 3 * H)),
        "dense: 3 matmuls, same shapes, one weight": dense3_step(x_ND, h_NF, d1, d3, d2, g_grads),
        "ours: 3x grouped_mm": gemm_step(grouped_mm, x_ND, h_NF, w1, w3, w2, offsets, g_grads),
        "3x looped_mm (per-expert loop)": gemm_step(looped_mm, x_ND, h_NF, w1, w3, w2, offsets, g_grads),
    }
    gemm_t = time_side_by_side(gemm_fns, args.warmup, args.reps)
    gemm_flops = 3 * (2 * N * D * H) * 3  # 3 matmuls of 2NDH each; backward = 2x forward

    load_end = os.getloadavg()[0]

    # --- report
    kernel = "torch._grouped_mm" if grouped_mm_supported("cpu", torch.float32) else "looped fallback"
    ds_desc = f"deepspeed {ds_version}" if ds is not None else "deepspeed: skipped"
    print(
        f"MoE layer fwd+bwd, fp32 CPU | T={T} tokens (B={B} x S={S}), D={D}, H={H}, E={E}, K={K}, "
        f"shared=0, SwiGLU experts | torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"grouped_mm -> {kernel} | {ds_desc} | median of {args.reps} (warmup {args.warmup}) | "
        f"load avg {load_start:.1f} -> {load_end:.1f}"
        + (" | --quick: smoke test, timings meaningless" if args.quick else "")
    )
    print()
    layer_flops = 18 * N * D * H  # routed-expert FLOPs a dropless layer must do (fwd+bwd)
    ours_ms = med_ms(layer_t["ours (grouped GEMM, dropless)"])
    rows = [
        [name, f"{med_ms(ts):.1f}", f"{min(ts) * 1e3:.1f}", f"{T / (med_ms(ts) / 1e3):,.0f}"]
        + [f"{layer_flops / (med_ms(ts) / 1e3) / 1e9:.1f}", f"{ours_ms / med_ms(ts):.2f}x"]
        for name, ts in layer_t.items()
    ]
    header = ["variant", "fwd+bwd ms (median)", "min ms", "tokens/s", "expert GFLOP/s", "tokens/s vs ours"]
    print_table(header, rows, left=1)
    print()
    dense_ms = med_ms(gemm_t["dense: one matmul [N,D]@[D,3H] (reference)"])
    rows = [
        [name, f"{med_ms(ts):.1f}", f"{min(ts) * 1e3:.1f}", f"{gemm_flops / (med_ms(ts) / 1e3) / 1e9:.1f}"]
        + [f"{100 * dense_ms / med_ms(ts):.0f}%"]
        for name, ts in gemm_t.items()
    ]
    header = [f"expert GEMMs, fwd+bwd, N=T*K={N} rows, {gemm_flops / 1e9:.2f} GFLOP", "ms (median)", "min ms"]
    print_table(header + ["GFLOP/s", "% of dense"], rows, left=1)
    print()

    counts = tokens_per_expert.tolist()
    print(f"- per-expert rows (our router): min {min(counts)}, max {max(counts)}, mean {N / E:.0f}")
    print(f"- correctness: max |naive - ours| = {naive_err:.2e}, max |looped_mm - grouped_mm| = {looped_err:.2e}")
    grouped_ms = med_ms(gemm_t["ours: 3x grouped_mm"])
    print(f"- expert GEMMs alone are {100 * grouped_ms / ours_ms:.0f}% of our layer's fwd+bwd time")
    if ds is not None:
        dropped, cap, padded = deepspeed_route_stats(ds, x)
        print(
            f"- DeepSpeed: softmax top-{K} gating, dropped {dropped} of {N} routes; capacity C={cap}/expert, "
            f"so its experts compute E*C={padded} rows vs {N} routed ({100 * (padded / N - 1):.0f}% padding)"
        )
        ds_ts = layer_t["DeepSpeed MoE (ep=1, drop_tokens=False)"]
        speedup = med_ms(ds_ts) / ours_ms
        speedup_min = min(ds_ts) / min(layer_t["ours (grouped GEMM, dropless)"])
        verdict = "MET" if speedup >= 2.0 else "NOT MET"
        print(
            f"- goal 1, ours >= 2x DeepSpeed tokens/s: {verdict} (ours is {speedup:.2f}x DeepSpeed, {speedup_min:.2f}x "
            f"by min times; ceiling if all our non-GEMM work were free: DeepSpeed ms / our expert-GEMM ms = "
            f"{med_ms(ds_ts) / grouped_ms:.2f}x)"
        )
    else:
        print(f"- goal 1, ours >= 2x DeepSpeed tokens/s: NOT EVALUATED (DeepSpeed unavailable: {ds_error})")
    pct = 100 * dense_ms / grouped_ms
    pct_min = 100 * min(gemm_t["dense: one matmul [N,D]@[D,3H] (reference)"]) / min(gemm_t["ours: 3x grouped_mm"])
    verdict = "MET" if pct >= 80 else "NOT MET"
    print(f"- goal 2, expert GEMMs >= 80% of dense-matmul GFLOP/s: {verdict} ({pct:.0f}%, {pct_min:.0f}% by min times)")
    spread = {n: statistics.median(ts) / min(ts) for n, ts in {**layer_t, **gemm_t}.items() if len(ts) > 1}
    noisy = {n: r for n, r in spread.items() if r > 1.3}
    if noisy:
        worst = max(noisy, key=noisy.get)
        print(
            f"- WARNING noisy run: median/min up to {noisy[worst]:.1f}x ({worst}); other processes were likely "
            f"competing for the {torch.get_num_threads()} threads (load avg {load_start:.1f} -> {load_end:.1f}). "
            "Many small parallel regions (grouped_mm, per-expert loops) suffer most; rerun on a quiet machine."
        )

    if ds is not None:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
