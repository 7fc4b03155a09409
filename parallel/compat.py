"""Feature checks for what differs between the supported torch releases, in one place."""

from __future__ import annotations

from torch.distributed.tensor import DTensor


def local_shape_and_global_offset(param: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of `param`, strided FSDP-over-EP
    shards included. The helper is private in torch (2.4 onwards, same signature)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offset)
