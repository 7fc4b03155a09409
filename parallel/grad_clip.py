"""Gradient-norm clipping across meshes: dense grads live on the dp mesh, experts on theirs.

torch's clip_grad_norm_ cannot mix DTensors of different meshes, so each mesh's norm is
taken on its own (full_tensor() sums over its shards) and the squares are added.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.float() ** 2


def clip_grad_norm(
    dense: list[nn.Parameter],
    experts: list[nn.Parameter],
    max_norm: float,
    device: torch.device,
    pp_group: dist.ProcessGroup | None = None,
    uncounted: Sequence[nn.Parameter] = (),
) -> torch.Tensor:
    """Scale every gradient so the global L2 norm is at most max_norm (0 or inf: never).
    With `pp_group`, each pipeline stage holds other parameters: the squares add over it.
    `uncounted`: parameters that another stage holds too (a tied copy, DualPipe's second model
    copy), scaled but not counted twice. -> the norm before clipping."""
    skip = {id(p) for p in uncounted}
    dense_sq = _squared_norm([p.grad for p in dense if p.grad is not None and id(p) not in skip], device)
    expert_sq = _squared_norm([p.grad for p in experts if p.grad is not None and id(p) not in skip], device)
    total_sq = dense_sq + expert_sq
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if max_norm > 0 and math.isfinite(max_norm):
        # On the device, no host sync: multiplying by a coefficient of exactly 1 changes nothing.
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [_local(p.grad) for p in dense + experts if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor gradient (each shard is scaled by the same factor)."""
    return t.to_local() if hasattr(t, "to_local") else t
