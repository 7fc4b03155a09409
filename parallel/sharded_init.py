"""Where a parameter's local shard sits in the global tensor, so a model built on the meta
device can be initialised shard by shard with the values a full init would give.

Every sharding we apply (expert parallelism, FSDP2, HSDP) splits dimension 0 only, so a
shard is a run of global rows; DTensor's placement math tells which.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from parallel.compat import local_shape_and_global_offset


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """-> (the tensor this rank writes, the global row its first row is). A plain tensor is
    its own shard from row 0; a DTensor's local tensor is a view of its storage."""
    if not isinstance(param, DTensor):
        return param, 0
    local = param.to_local()
    if local.numel() == 0:
        return local, 0
    shape, offset = local_shape_and_global_offset(param)
    if tuple(shape) != tuple(local.shape) or any(offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise NotImplementedError(
            f"a shard of shape {tuple(local.shape)} at offset {tuple(offset)} of {tuple(param.shape)} "
            "is not a run of whole rows; sharded init supports dimension-0 sharding only"
        )
    return local, offset[0]
