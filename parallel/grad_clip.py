"""Gradient-norm clipping across meshes: dense grads live on the dp mesh, experts on theirs.

Each rank sums the squares of the gradient shards it holds (a replica's copy counted once) and
one all-reduce adds them up, instead of DTensor's per-mesh-dimension reductions of the norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from parallel.shards import local_shard


def _squared_norm(grads: list[torch.Tensor], device: torch.device, summed_later: bool) -> torch.Tensor:
    """Sum of squares of `grads` in float32, DTensors grouped by (mesh, placements). `summed_later`:
    the caller adds this rank's result over every rank of the meshes, so a group counts nothing on
    a rank that is not the first along a Replicate mesh dimension (HSDP replicas hold the same
    shard). Otherwise each group is all-reduced over its own mesh's sharded dimensions here."""
    total = torch.zeros((), device=device)
    groups: dict[tuple | None, list[torch.Tensor]] = {}
    for g in grads:
        key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    for key, members in groups.items():
        local = [local_shard(g) for g in members]
        sq = torch.nn.utils.get_total_norm(local, norm_type=2.0).float() ** 2
        if key is not None:
            mesh, placements = members[0].device_mesh, members[0].placements
            for dim, placement in enumerate(placements):
                replicated = isinstance(placement, Replicate)
                if summed_later and replicated and mesh.get_local_rank(dim) != 0:
                    sq = sq * 0.0  # exactly zero: the replica of index 0 counts this shard
                elif not summed_later and not replicated:
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total = total + sq
    return total


def clip_grad_norm(
    dense: list[nn.Parameter],
    experts: list[nn.Parameter],
    max_norm: float,
    device: torch.device,
    pp_group: dist.ProcessGroup | None = None,
    uncounted: Sequence[nn.Parameter] = (),
    dp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale every gradient so the global L2 norm is at most max_norm (0 or inf: never).
    `dp_group`: the ranks that every gradient's mesh spans (the data-parallel ranks of this stage):
    dense and expert squares add over it in one all-reduce; without it each mesh's sharded
    dimensions are reduced one by one. With a dp_group of more than one rank every gradient must
    be a DTensor (the trainer's are: FSDP2 shards every parameter): a plain tensor would be a
    replica on each rank and count once per rank, so it is refused. With `pp_group`, each
    pipeline stage holds other parameters: the squares add over it too. `uncounted`: parameters that another stage holds
    too (a tied copy, DualPipe's second model copy), scaled but not counted twice.
    -> the norm before clipping."""
    skip = {id(p) for p in uncounted}
    dense_grads = [p.grad for p in dense if p.grad is not None and id(p) not in skip]
    expert_grads = [p.grad for p in experts if p.grad is not None and id(p) not in skip]
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        plain = next((g for g in dense_grads + expert_grads if not isinstance(g, DTensor)), None)
        if plain is not None:
            raise ValueError(
                f"clip_grad_norm: a gradient of shape {tuple(plain.shape)} is a plain tensor, not a DTensor: with a "
                f"dp_group of {dist.get_world_size(dp_group)} ranks it would count once per rank; shard it "
                "(FSDP2) or pass dp_group=None"
            )
    total_sq = _squared_norm(dense_grads + expert_grads, device, summed_later=dp_group is not None)
    if dp_group is not None:
        dist.all_reduce(total_sq, group=dp_group)
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm > 0 and math.isfinite(max_norm):
        # On the device, no host sync: multiplying by a coefficient of exactly 1 changes nothing.
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [local_shard(p.grad) for p in dense + experts if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total
