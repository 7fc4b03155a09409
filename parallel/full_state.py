"""Gather a sharded model back into the state dict one process would hold.

Dense weights are DTensors (full_tensor() gathers them); experts are additionally split
over the EP ranks, so each EP rank's slice is gathered and concatenated in expert order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

EXPERT_WEIGHT_SUFFIXES = (".experts.w1", ".experts.w2", ".experts.w3")


def full_state_dict(model: nn.Module, ep_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """Collective: every rank must call it. -> full CPU tensors keyed as in the plain model."""
    ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
    out = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if ep_size > 1 and name.endswith(EXPERT_WEIGHT_SUFFIXES):
            parts = [torch.empty_like(full) for _ in range(ep_size)]
            dist.all_gather(parts, full.contiguous(), group=ep_group)
            full = torch.cat(parts, dim=0)
        out[name] = full.detach().cpu()
    return out
