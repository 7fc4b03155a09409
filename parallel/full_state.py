"""Gather a sharded model back into the state dict one process would hold."""

from __future__ import annotations

import torch
from torch import nn


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every rank must call it. Dense and expert weights are DTensors with their
    global shapes (experts sharded over EP and FSDP), so full_tensor() assembles each one.
    -> full CPU tensors keyed as in the plain model."""
    out = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[name] = full.detach().cpu()
    return out
