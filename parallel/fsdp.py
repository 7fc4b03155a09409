"""Data parallelism with FSDP2: each block, MTP module and the root sharded on the dp mesh.

On a 2-D (dp_replicate, dp_shard) mesh this is HSDP: sharded within a group, replicated
across groups, so all-gathers stay on the fast links inside a node.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def apply_fsdp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard per transformer block, so only one block's full weights exist at a time."""
    for block in list(model.layers) + list(model.mtp):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
