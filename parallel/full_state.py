"""Gather a sharded model back into the state dict one process would hold."""

from __future__ import annotations

import torch
from torch import nn

from parallel.shards import full_tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every rank must call it. Dense and expert weights are DTensors with their
    global shapes (experts sharded over EP and FSDP), so full_tensor() assembles each one.
    -> full CPU tensors keyed as in the plain model."""
    return {name: full_tensor(value).cpu() for name, value in model.state_dict().items()}
