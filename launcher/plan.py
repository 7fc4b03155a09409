"""`moe-launch plan`: per-rank memory and per-step communication of a config, as tables;
validates like `train`, imports no torch, needs no GPU: "does it fit?" before a job is queued."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from launcher.compose import compose_config
from launcher.errors import ConfigError
from launcher.validation import validate
from parallel.plan import PipelineRank, Plan, RankMemory, plan

EXIT_DOES_NOT_FIT = 1
MEMORY_COLUMNS = (
    ("params", "params"),
    ("grads", "grads"),
    ("optimizer", "optimizer"),
    ("buffers", "buffers"),
    ("FSDP unsharded", "fsdp_in_flight"),
    ("accumulated grads", "accumulated_grads"),
    ("activations", "activations"),
)


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts, start = [], ranks[0]
    for prev, cur in zip(ranks, [*ranks[1:], None], strict=True):
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def _count(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Columns padded to their widest cell; the first `left` columns left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(header), *(line(r) for r in rows)]


def piece_list(names: tuple[str, ...]) -> str:
    """('embed', 'layers.0', 'layers.1', 'layers.2', 'head') -> 'embed, layers.0-2, head'."""
    out: list[str] = []
    layers: list[int] = []
    for name in [*names, ""]:
        if name.startswith("layers."):
            layers.append(int(name.removeprefix("layers.")))
            continue
        if layers:
            out.append(f"layers.{rank_ranges(layers).replace(',', ',layers.')}")
            layers = []
        if name:
            out.append(name)
    return ", ".join(out)


def _pipeline_lines(p: Plan, schedule: str) -> list[str]:
    """One line per pipeline rank: its global ranks, stages with their pieces, micro-batches in flight."""
    dp = p.layout.dp
    out = [
        f"pipeline {schedule}: per pipeline rank, its stages' pieces and the micro-batches whose activations they hold"
    ]
    for pp_rank, held in enumerate(p.pipeline):
        in_flight = dict(held.in_flight)
        stages = "; ".join(f"stage {s}: {piece_list(names)} ({in_flight[s]} in flight)" for s, names in held.stages)
        ranks = rank_ranges(list(range(pp_rank * dp, (pp_rank + 1) * dp)))
        out.append(f"  pp rank {pp_rank} (rank{'s' if dp > 1 else ''} {ranks}): {stages}{_embedding_copy(held)}")
    return out


def _embedding_copy(held: PipelineRank) -> str:
    ran = {name for _, names in held.stages for name in names}
    return "; + the embedding for the MTP modules" if "embed" in held.pieces and "embed" not in ran else ""


def format_plan(cfg: DictConfig, p: Plan) -> tuple[str, bool]:
    """The report a user reads, and whether every rank fits in launcher.gpu_memory_gb."""
    lay, m, launch = p.layout, cfg.model, cfg.launcher
    capacity = launch.gpu_memory_gb * 1e9
    groups: dict[RankMemory, list[int]] = {}
    for rank, mem in enumerate(p.ranks):
        groups.setdefault(mem, []).append(rank)
    biggest = max(mem.total for mem in groups)
    unit, scale = ("GB", 1e9) if biggest >= 1e9 else ("MB", 1e6)
    moe_layers = m.n_layers - m.first_k_dense
    out = [
        f"moe-launch plan: {cfg.experiment} | world {lay.world_size} = {launch.nnodes} node"
        f"{'s' if launch.nnodes > 1 else ''} x "
        f"{launch.nproc_per_node} (pp {lay.pp} x dp_replicate {lay.dp_replicate} x dp_shard {lay.dp_shard}, "
        f"ep {lay.ep}; experts: edp_replicate {lay.edp_replicate} x edp_shard {lay.edp_shard}) | {p.precision}",
        f"model {m.name}: {_count(p.total_params)} params ({_count(p.expert_params)} in routed experts of "
        f"{moe_layers + (m.mtp_depth if moe_layers else 0)} MoE blocks), {_count(p.active_params)} active per token",
        f"batch: micro-batch {p.micro_batch_size} x seq_len {m.seq_len}, {p.micro_batches} micro-batch"
        f"{'es' if p.micro_batches > 1 else ''} per step per rank, activation checkpointing "
        f"{p.activation_checkpointing}",
    ]
    if p.pipeline:
        out += _pipeline_lines(p, cfg.parallel.pp_schedule)
        peak = "the most micro-batches in flight"
    else:
        peak = "the start of the last micro-batch's backward"
    out += ["", f"memory per rank in {unit} (10^{round(math.log10(scale))} bytes), at the peak: {peak}"]
    header = ["ranks", *(name for name, _ in MEMORY_COLUMNS), "total", f"of {launch.gpu_memory_gb:g} GB"]
    rows = []
    for mem, ranks in sorted(groups.items(), key=lambda kv: kv[1][0]):
        cells = [f"{getattr(mem, attr) / scale:.2f}" for _, attr in MEMORY_COLUMNS]
        share = mem.total / capacity
        rows.append([rank_ranges(ranks), *cells, f"{mem.total / scale:.2f}", f"{share:.0%}"])
    out += _table(header, rows)
    who = "the busiest pipeline rank" if p.pipeline else "per rank"
    out += ["", f"communication per step, {who}: bytes it sends (ring algorithms; balanced routing)"]
    most = max(c.bytes_per_step for c in p.comm)
    unit, scale = ("GB", 1e9) if most >= 1e9 else ("MB", 1e6)
    comm_rows = [[c.what, f"{c.group} {c.group_size}", f"{c.bytes_per_step / scale:.2f}"] for c in p.comm]
    out += _table(["collective", "group", f"{unit} per step"], comm_rows, left=2)
    fits = biggest <= capacity
    verdict = "fits" if fits else "does NOT fit"
    out += [
        "",
        f"{verdict}: the largest rank needs {biggest / 1e9:.2f} of {launch.gpu_memory_gb:g} GB "
        f"({biggest / capacity:.0%}); not counted: the CUDA context, NCCL buffers, allocator fragmentation",
    ]
    return "\n".join(out), fits


def run_plan(config: str, overrides: list[str]) -> int:
    """Compose and validate like `train` (minus this machine's GPUs and node count), then print."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"{ov}: not an override; expected KEY=VALUE (e.g. parallel.ep=8)")
    cfg = compose_config(config, overrides)
    layout = validate(cfg, on_this_machine=False)
    t = cfg.train
    try:
        result = plan(
            cfg.model,
            layout,
            t.precision,
            t.micro_batch_size,
            t.global_batch_size,
            t.activation_checkpointing,
            cfg.parallel.pp_schedule,
            cfg.parallel.pp_virtual_stages,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    report, fits = format_plan(cfg, result)
    print(report)
    return 0 if fits else EXIT_DOES_NOT_FIT
