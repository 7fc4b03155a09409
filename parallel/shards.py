"""A tensor that may be sharded (a DTensor) seen two ways: this rank's shard, and the whole
tensor one process would hold. Plain tensors pass through as themselves (a copy for the whole)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view that shares its storage); a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Collective for a DTensor (every rank of its mesh calls it): the whole tensor, detached;
    a plain tensor: a detached copy."""
    return t.full_tensor().detach() if isinstance(t, DTensor) else t.detach().clone()
