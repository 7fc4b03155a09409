"""Benchmark the split backward (CPU, gloo, pp=2): per stage, the whole backward (BW, as 1f1b runs it)
against its input-gradient half B and weight-gradient half W (as zb1p runs them), same model and data.

B + W close to BW means the split costs little (W redoes nothing; what it adds is W's engine calls,
one per level of forks, and backward_split.py's walk of the graph); W's share of B + W is what a
zero-bubble schedule can move into its bubbles. The first stage has no input gradient: its B computes
nothing and W everything. Wall times of separate processes follow this machine's load; `--baseline`
compares two revisions in one process on CPU time instead, with the activations each holds after B.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from framework.config import Config  # noqa: E402
from parallel.pipeline.actions import Kind  # noqa: E402
from scripts.benchlib import print_table, run_ranks  # noqa: E402

PP = 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--dims", type=str, default="128,512", help="model widths, one run each, in one table")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    p.add_argument("--checkpointing", type=str, default="none,full", help="activation checkpointing modes")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 timed step: a smoke test")
    p.add_argument(
        "--baseline",
        type=Path,
        help="another revision's backward_split.py (git show REV:parallel/pipeline/backward_split.py > F): "
        "instead of the pp=2 run, time BW, its B + W and this tree's B + W in turn in one process (CPU time)",
    )
    args = p.parse_args()
    if args.baseline is not None and not args.baseline.is_file():
        p.error(f"--baseline: {str(args.baseline)!r}: not a file (allowed: a backward_split.py)")
    if args.quick:
        args.dims, args.layers, args.seq_len, args.steps = "32", 2, 16, 1
    try:
        args.dims = [int(d) for d in args.dims.split(",")]
    except ValueError:
        p.error(f"--dims: {args.dims!r}: allowed: comma-separated widths, e.g. 128,512")
    if any(d < 32 or d % 32 for d in args.dims):
        p.error(f"--dims: {args.dims}: each must be a multiple of 32 (heads of 32)")
    args.checkpointing = args.checkpointing.split(",")
    for mode in args.checkpointing:
        if mode not in ("none", "full", "selective"):
            p.error(f"--checkpointing: {mode!r}: allowed: none, full, selective")
    return args


def config_yaml(args: argparse.Namespace, dim: int, schedule: str, checkpointing: str) -> str:
    heads = max(2, dim // 32)
    overrides = [
        f"model.dim={dim}", f"model.n_layers={args.layers}", f"model.n_heads={heads}",
        f"model.n_kv_heads={heads // 2}", "model.vocab_size=256", f"model.seq_len={args.seq_len}",
        f"model.ffn_dim={2 * dim}", "model.num_experts=8", "model.num_shared_experts=1", "model.top_k=2",
        f"model.expert_dim={dim // 2}", "model.first_k_dense=1", "model.mtp_depth=1",
        f"train.global_batch_size={args.microbatches}", "train.micro_batch_size=1",
        "data.source=synthetic", "data.synthetic_tokens=200000", "logging.wandb.mode=disabled",
        "train.device=cpu", f"parallel.pp={PP}", f"parallel.pp_schedule={schedule}",
        f"train.activation_checkpointing={checkpointing}",
    ]  # fmt: skip
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(overrides))
    cfg.launcher.nproc_per_node = PP
    cfg.run_dir = str(Path(args.run_dir) / f"{dim}-{schedule}-{checkpointing}")
    return OmegaConf.to_yaml(cfg)


def _measure(rank: int, world: int, cfg_yamls: dict[tuple[int, str, str], str], steps: int) -> dict:
    """-> (dim, schedule, checkpointing) -> (kind, stage) -> this rank's action times (s), timed steps only.
    A width's 1f1b and zb1p trainers take their steps in turn, so load from other processes that
    comes and goes falls on both alike."""
    from framework.distributed import DistContext
    from framework.train import Trainer

    torch.manual_seed(0)
    results: dict[tuple[int, str, str], dict[tuple[str, int], list[float]]] = {key: {} for key in cfg_yamls}
    for dim, checkpointing in dict.fromkeys((dim, ac) for dim, _, ac in cfg_yamls):
        keys = [key for key in cfg_yamls if (key[0], key[2]) == (dim, checkpointing)]
        trainers = {}
        for key in keys:
            cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yamls[key]))
            trainers[key] = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
        for i in range(1 + steps):
            for key, trainer in trainers.items():
                trainer.pipeline.timings = []
                dist.barrier()
                trainer.forward_backward_step(trainer.loader.next_step())
                trainer.optimizer.zero_grad(set_to_none=True)
                if i == 0:
                    continue
                for action, start, *_, end in trainer.pipeline.timings:  # a receive's entry has 4 times
                    if action.kind in (Kind.B, Kind.W, Kind.BW):
                        results[key].setdefault((str(action.kind), action.stage), []).append(end - start)
    return results


def _saved_bytes(root, skip: set[int]) -> int:
    """Bytes of the storages that the graph below `root` holds for its backward (`skip`: the
    parameters'); a tensor released after B (unpacking it raises) holds nothing."""
    held, seen, stack = {}, set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
        for attribute in (a for a in dir(node) if a.startswith("_saved_")):
            try:
                saved = getattr(node, attribute)
            except RuntimeError:
                continue
            for t in saved if isinstance(saved, (list, tuple)) else (saved,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in skip:
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(held.values())


def compare_in_process(args: argparse.Namespace) -> None:
    """BW, the baseline's B + W and this tree's B + W, in turn on one process's last stage of a
    pp=2 cut (the second half of the blocks, the head, the MTP block), with the thread's CPU time:
    robust to other processes' load, which wall times of separate runs are not. Then, per split,
    the activations the graph still holds after B (what a zero-bubble schedule keeps until W)."""
    import importlib.util

    from framework.model.args import ModelArgs
    from framework.model.transformer import MoETransformer
    from parallel.activation_checkpoint import apply_activation_checkpointing
    from parallel.pipeline import backward_split

    spec = importlib.util.spec_from_file_location("baseline_backward_split", args.baseline)
    baseline = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(baseline)
    torch.set_num_threads(1)
    rows = []
    for dim, ac in [(d, ac) for d in args.dims for ac in args.checkpointing]:
        cfg = OmegaConf.create(config_yaml(args, dim, "1f1b", ac))
        model = MoETransformer(ModelArgs.from_config(cfg.model))
        model.init_weights(0)
        blocks = [str(i) for i in range(args.layers // 2, args.layers)]
        apply_activation_checkpointing([model.layers[b] for b in blocks], ac)
        pieces = frozenset({*(f"layers.{b}" for b in blocks), "head"})

        def timed(run, seed: int, dim: int = dim, model=model, pieces=pieces) -> float:
            g = torch.Generator().manual_seed(seed)
            tokens = torch.randint(0, 256, (1, args.seq_len), generator=g)
            h = torch.randn(1, args.seq_len, dim, generator=g).requires_grad_()
            loss = sum(o.float().square().mean() for o in model(tokens, h, pieces))
            start = time.thread_time()
            run(loss, h)
            return 1e3 * (time.thread_time() - start)

        def split(module):
            return lambda loss, h: module.backward_weight(module.backward_input(loss, None, h)[1])

        def held_after_b(module, seed: int = 0, dim: int = dim, model=model, pieces=pieces) -> float:
            """MiB of activations the graph still holds for its backward after B (untimed run)."""
            g = torch.Generator().manual_seed(seed)
            tokens = torch.randint(0, 256, (1, args.seq_len), generator=g)
            h = torch.randn(1, args.seq_len, dim, generator=g).requires_grad_()
            loss = sum(o.float().square().mean() for o in model(tokens, h, pieces))
            _, pending = module.backward_input(loss, None, h)
            held = _saved_bytes(loss.grad_fn, {p.untyped_storage().data_ptr() for p in model.parameters()})
            module.backward_weight(pending)
            model.zero_grad(set_to_none=True)
            return held / 2**20

        runs = {"BW": lambda loss, h: loss.backward(), "baseline": split(baseline), "this tree": split(backward_split)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for i in range(2 + 3 * args.steps):  # two warm-up rounds; each round starts with another run
            for name in names[i % 3 :] + names[: i % 3]:
                times[name].append(timed(runs[name], i))
        ms = {name: statistics.median(t[2:]) for name, t in times.items()}
        for name, module in (("baseline", baseline), ("this tree", backward_split)):
            ratio = f"{ms[name] / ms['BW']:.2f}"
            rows.append([dim, ac, name, f"{ms['BW']:.2f}", f"{ms[name]:.2f}", ratio, f"{held_after_b(module):.2f}"])
    print(
        f"one process, the last stage of a pp=2 cut ({args.layers} blocks, seq {args.seq_len}), "
        f"CPU ms, medians of {3 * args.steps} runs each, in turn; baseline: {args.baseline}\n"
    )
    print_table(["dim", "checkpointing", "split", "BW ms", "B + W ms", "(B + W) / BW", "saved MiB after B"], rows, 3)


def main() -> None:
    args = parse_args()
    if args.baseline is not None:
        args.run_dir = "unused"  # nothing is written: the model is built from the config alone
        compare_in_process(args)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:
        args.run_dir = run_dir
        cfgs = {
            (dim, s, ac): config_yaml(args, dim, s, ac)
            for dim in args.dims
            for ac in args.checkpointing
            for s in ("1f1b", "zb1p")
        }
        started = time.perf_counter()
        per_rank = run_ranks(_measure, PP, cfgs, args.steps, timeout_s=1800)
    print(
        f"pp={PP}, {args.microbatches} micro-batches of 1 x {args.seq_len} tokens, dims {args.dims}, "
        f"{args.layers} blocks, {args.steps} timed steps (median per action over both ranks' samples: "
        f"robust to load from other processes); {time.perf_counter() - started:.0f} s\n"
    )
    rows = []
    for dim, ac, stage in [(d, ac, st) for d in args.dims for ac in args.checkpointing for st in range(PP)]:
        ms = {}
        for schedule, kind in (("1f1b", "BW"), ("zb1p", "B"), ("zb1p", "W")):
            samples = [t for r in per_rank for t in r[(dim, schedule, ac)].get((kind, stage), [])]
            ms[kind] = 1e3 * statistics.median(samples)
        split = ms["B"] + ms["W"]
        row = [dim, ac, stage, *(f"{ms[k]:.2f}" for k in ("BW", "B", "W")), f"{split:.2f}"]
        rows.append([*row, f"{split / ms['BW']:.2f}", f"{ms['W'] / split:.0%}"])
    print_table(
        ["dim", "checkpointing", "stage", "BW ms", "B ms", "W ms", "B + W ms", "(B + W) / BW", "W share"], rows, 2
    )


if __name__ == "__main__":
    main()
