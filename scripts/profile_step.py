"""Profile training steps on one process with torch.profiler and print where the time goes.

    python scripts/profile_step.py config=deepseek_small train.device=cuda [OVERRIDES ...]

Composes and validates the config as `moe-launch train` does, builds the real Trainer as
a world of one, runs warm-up steps, then profiles --steps steps and prints the top ops by
self device time (CPU time on a CPU run), and the share of the expert grouped GEMMs,
attention, collectives and the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from launcher.cli import _split_config  # noqa: E402
from launcher.compose import compose_config  # noqa: E402
from launcher.errors import ConfigError  # noqa: E402
from launcher.validation import validate  # noqa: E402

GROUPS = {  # op-name fragments -> the part of the step they belong to
    "expert grouped GEMM": ("grouped_mm",),
    "matmul (dense, attention projections, head)": ("aten::mm", "aten::addmm", "aten::bmm", "gemm", "matmul"),
    "attention kernel": ("flash", "attention", "sdpa"),
    "collectives (FSDP, EP)": ("nccl", "all_gather", "reduce_scatter", "all_to_all", "allreduce", "gloo"),
    "optimizer": ("foreach", "adam"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=3, help="steps before profiling (compile, allocator)")
    parser.add_argument("--steps", type=int, default=2, help="steps profiled")
    parser.add_argument("--top", type=int, default=15, help="ops listed")
    args, overrides = parser.parse_known_args()
    config, rest = _split_config(overrides)
    run_dir = tempfile.mkdtemp(prefix="profile_step.")
    fixed = ["launcher.nproc_per_node=1", f"run_dir={run_dir}", "logging.wandb.mode=disabled"]
    try:
        cfg = compose_config(config, [*rest, *fixed])
        validate(cfg)
    except ConfigError as err:
        print(f"profile_step: error: {err}", file=sys.stderr)
        sys.exit(2)

    from framework.distributed import init_distributed
    from framework.train import Trainer

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    ctx = init_distributed(cfg.train.collective_timeout_s, cfg.train.device)
    trainer = Trainer(cfg, ctx)
    for _ in range(args.warmup):
        trainer.train_step()
    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    print(events.table(sort_by=key, row_limit=args.top))
    total = sum(getattr(e, key) for e in events) or 1
    shares = dict.fromkeys([*GROUPS, "other"], 0.0)
    for e in events:
        name = e.key.lower()
        group = next((g for g, frags in GROUPS.items() if any(f in name for f in frags)), "other")
        shares[group] += getattr(e, key)
    unit = "device" if cuda else "CPU"
    print(f"# where the {unit} time of {args.steps} steps goes ({total / 1e3 / args.steps:.1f} ms per step)")
    for group, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"{group:45s} {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
