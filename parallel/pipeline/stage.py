"""A rank's pipeline stages cut from the whole model: the pieces each of its stages runs, the
model pruned to them (parameter names unchanged, so checkpoints move between pp), its FSDP units,
and under DualPipe its mirror rank (the same stages in the other model copy).

Works on any model with the transformer's attribute names (embed, layers keyed "0".., norm,
head, mtp); it never imports the framework.
"""

from __future__ import annotations

from torch import nn

from parallel.pipeline.stage_cut import StagePlan


def rank_stage_pieces(plan: StagePlan, rank: int) -> dict[int, frozenset[str]]:
    """stage -> the piece names it runs ("embed", "layers.i", "head", "mtp.k"), for the stages
    `rank` holds in any model copy. A stage runs the same pieces in both DualPipe copies, and a
    rank never holds one stage twice, so the stage number alone names the pieces."""
    held = [s for ranks in plan.stage_ranks for s, r in enumerate(ranks) if r == rank]
    if len(held) != len(set(held)):
        raise ValueError(f"pipeline schedule {plan.schedule!r}: rank {rank} holds a stage twice ({sorted(held)})")
    return {s: frozenset(plan.stages[s]) for s in sorted(held)}


def mirror_rank(plan: StagePlan, rank: int) -> int | None:
    """The other pipeline rank that holds the same stages (so the same parameters) in the other
    model copy: pp-1-rank under DualPipe; None with one copy. The two copies' gradients are
    summed over such a mirror pair, so their weights stay identical."""
    if len(plan.stage_ranks) == 1:
        return None
    forward_copy, reverse_copy = plan.stage_ranks
    (stage,) = [s for s, r in enumerate(forward_copy) if r == rank]
    other = reverse_copy[stage]
    if other == rank or set(rank_stage_pieces(plan, other)) != set(rank_stage_pieces(plan, rank)):
        raise ValueError(f"pipeline schedule {plan.schedule!r}: rank {rank} has no mirror rank with its stages")
    return other


def keep_pieces(model: nn.Module, pieces: frozenset[str]) -> None:
    """Delete from `model` (on the meta device, before sharding) every piece not in `pieces`;
    what stays keeps its name. The final norm and the MTP modules go with the head; the
    embedding stays where the MTP modules are (they embed the next tokens)."""
    for name in list(model.layers.keys()):
        if f"layers.{name}" not in pieces:
            del model.layers[name]
    if "head" not in pieces:
        model.norm = None
        model.head = None
        model.mtp = nn.ModuleList()
    if "embed" not in pieces and not ("head" in pieces and len(model.mtp) > 0):
        model.embed = None


def fsdp_units(model: nn.Module, pieces: frozenset[str]) -> list[nn.Module]:
    """The FSDP-wrapped modules whose parameters a stage of `pieces` uses (its blocks with their
    experts, its MTP modules, the embedding (its own unit: for the first stage, and for the MTP
    modules on the head's), and the root, which holds the final norm and head)."""
    subtrees: list[nn.Module] = []
    if model.embed is not None and ("embed" in pieces or ("head" in pieces and len(model.mtp) > 0)):
        subtrees.append(model.embed)
    for name in sorted(pieces):
        if name.startswith("layers."):
            subtrees.append(model.layers[name.removeprefix("layers.")])
    if "head" in pieces:
        subtrees.extend(model.mtp)
    units = [m for tree in subtrees for m in tree.modules() if hasattr(m, "set_requires_gradient_sync")]
    if ("embed" in pieces or "head" in pieces) and hasattr(model, "set_requires_gradient_sync"):
        units.append(model)
    return units
