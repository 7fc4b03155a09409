"""Feature checks for what differs between the supported torch releases, in one place."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_shape_and_global_offset(param: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of `param`, strided FSDP-over-EP
    shards included. The helper is private in torch (2.4 onwards, same signature)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offset)


def torch_dispatch_mode() -> type:
    """The base class of a mode that sees every op below autograd (torch.utils._python_dispatch,
    the same path and contract from 2.0 on; torch exports no public alias)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def ops_that_exist(*names: str) -> frozenset:
    """The `torch.ops` overload packets among `names` ("aten._grouped_mm", ...) that this torch
    build has: attention kernels and collectives differ between releases and devices."""
    found = set()
    for name in names:
        namespace, op = name.split(".", 1)
        try:
            found.add(getattr(getattr(torch.ops, namespace), op))
        except (AttributeError, RuntimeError):
            continue
    return frozenset(found)


def detach_below_autograd(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.detach()` from inside a TorchDispatchMode that still shares the version counter
    (so a later in-place change shows): the ADInplaceOrView key is re-included for it, as
    torch.utils.checkpoint's own selective checkpointing does (private guard, 2.4 onwards)."""
    guard = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
    if guard is None:
        return tensor.detach()
    with guard(torch._C.DispatchKey.ADInplaceOrView, False):
        return tensor.detach()
