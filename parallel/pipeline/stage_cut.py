"""Where to cut the layer stack into pipeline stages: a per-piece cost model (training FLOPs per
token of the embedding, dense and MoE blocks, head, MTP modules) and the min-max contiguous cut.

Takes plain numbers (any object or mapping with the model config's field names), never the
framework's model, so the launcher can plan and print a cut before any process starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from parallel.pipeline.schedules import PIPELINE_SCHEDULES, stage_placement

_MODEL_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "seq_len",
    "ffn_dim",
    "num_experts",
    "num_shared_experts",
    "top_k",
    "expert_dim",
    "first_k_dense",
    "mtp_depth",
)


@dataclass(frozen=True)
class Piece:
    """One indivisible part of the model, named by its parameter prefix, and its cost."""

    name: str
    cost: float


def model_pieces(model: Mapping | object) -> list[Piece]:
    """The model in order (embed, layers.0 .. layers.L-1, head, mtp.0 ..), each with its training
    FLOPs per token: 6 x the weights it multiplies through, plus 6 x seq_len x dim for causal
    attention (the count framework/flops.py uses for MFU). The embedding is a lookup (0 FLOPs);
    `head` includes the final norm; an MTP module also runs the shared output head."""
    get = model.get if isinstance(model, Mapping) else lambda k: getattr(model, k, None)
    m = {k: get(k) for k in _MODEL_FIELDS}
    missing = [k for k, v in m.items() if v is None]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}: needed to estimate stage costs")
    dim = m["dim"]
    head_dim = dim // m["n_heads"]
    attention = 6 * dim * head_dim * (2 * m["n_heads"] + 2 * m["n_kv_heads"]) + 6 * m["seq_len"] * dim
    dense_ffn = 6 * 3 * dim * m["ffn_dim"]
    moe_ffn = 6 * (3 * dim * m["expert_dim"] * (m["top_k"] + m["num_shared_experts"]) + dim * m["num_experts"])
    head = 6 * dim * m["vocab_size"]
    pieces = [Piece("embed", 0.0)]
    for i in range(m["n_layers"]):
        pieces.append(Piece(f"layers.{i}", float(attention + (moe_ffn if i >= m["first_k_dense"] else dense_ffn))))
    pieces.append(Piece("head", float(head)))
    mtp_ffn = moe_ffn if m["n_layers"] > m["first_k_dense"] else dense_ffn
    for i in range(m["mtp_depth"]):
        pieces.append(Piece(f"mtp.{i}", float(attention + mtp_ffn + 6 * 2 * dim * dim + head)))
    return pieces


def cut_stages(pieces: Sequence[Piece], num_stages: int) -> list[list[Piece]]:
    """Cut `pieces` into `num_stages` contiguous non-empty stages minimising the costliest stage
    (ties: the smaller sum of squared stage costs, i.e. the more even cut). The output head and
    the MTP modules after it stay in one stage: the MTP modules share the head."""
    units: list[list[Piece]] = []
    for piece in pieces:
        if piece.name.startswith("mtp.") and units and units[-1][0].name == "head":
            units[-1].append(piece)
        else:
            units.append([piece])
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages}: must be >= 1")
    if num_stages > len(units):
        raise ValueError(
            f"{num_stages} stages: the model has only {len(units)} pieces to cut "
            f"({', '.join(u[0].name for u in units[:3])}, ...); use fewer stages"
        )
    prefix = [0.0]
    for unit in units:
        prefix.append(prefix[-1] + sum(p.cost for p in unit))
    n = len(units)
    inf = (float("inf"), float("inf"))
    # best[k][j]: (max, sum of squares) of the best cut of units[:j] into k stages; cut[k][j]: its last start
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                cost = prefix[j] - prefix[i]
                cand = (max(best[k - 1][i][0], cost), best[k - 1][i][1] + cost * cost)
                if cand < best[k][j]:
                    best[k][j], cut[k][j] = cand, i
    bounds, j = [], n
    for k in range(num_stages, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    return [[p for unit in units[i:j] for p in unit] for i, j in reversed(bounds)]


@dataclass(frozen=True)
class StagePlan:
    """The cut for one schedule: stage -> piece names, stage costs, and which rank holds what."""

    schedule: str
    pp: int
    stages: tuple[tuple[str, ...], ...]
    stage_costs: tuple[float, ...]
    stage_ranks: tuple[tuple[int, ...], ...]

    def rank_cost(self, rank: int) -> float:
        """Cost of one micro-batch through every stage this rank holds (both copies for DualPipe,
        which each carry half the micro-batches, so the sum is halved)."""
        copies = len(self.stage_ranks)
        total = sum(self.stage_costs[s] for ranks in self.stage_ranks for s, r in enumerate(ranks) if r == rank)
        return total / copies

    def rank_of_piece(self, name: str, direction: int = 0) -> int:
        for s, names in enumerate(self.stages):
            if name in names:
                return self.stage_ranks[direction][s]
        raise KeyError(name)


def plan_stages(pieces: Sequence[Piece], schedule: str, pp: int, virtual_stages: int = 2) -> StagePlan:
    """Cut the model for `schedule` on `pp` ranks: pp stages, pp x virtual_stages for
    interleaved_1f1b, 2pp for dualpipev (a V: rank 0 holds the first and the last stage, so
    the embedding and the head with the MTP modules share a rank, as in DeepSeek-V3). dualpipe
    cuts pp stages and each rank r also holds stage pp-1-r of the reverse copy, so ranks 0 and
    pp-1 each hold one copy's embedding and the other copy's head."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r}: allowed: {', '.join(PIPELINE_SCHEDULES)}")
    placement = stage_placement(schedule, pp, virtual_stages)
    stages = cut_stages(pieces, len(placement[0]))
    return StagePlan(
        schedule=schedule,
        pp=pp,
        stages=tuple(tuple(p.name for p in stage) for stage in stages),
        stage_costs=tuple(sum(p.cost for p in stage) for stage in stages),
        stage_ranks=placement,
    )


def mtp_needs_embedding(plan: StagePlan) -> bool:
    """True where a rank holds the stage with the MTP modules (which embed the next tokens) but
    not the embedding's stage, in any model copy: the runtime cannot share one weight across
    ranks. Under DualPipe the head's rank holds the embedding's stage of the other copy."""
    has_mtp = any(name.startswith("mtp.") for stage in plan.stages for name in stage)
    embed_stage = next(s for s, names in enumerate(plan.stages) if "embed" in names)
    head_stage = next(s for s, names in enumerate(plan.stages) if "head" in names)
    held = [{s for ranks in plan.stage_ranks for s, r in enumerate(ranks) if r == rank} for rank in range(plan.pp)]
    return has_mtp and any(head_stage in stages and embed_stage not in stages for stages in held)
