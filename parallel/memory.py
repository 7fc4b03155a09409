"""Per-rank bytes of parameters, gradients and optimizer state: what sharding saved."""

from __future__ import annotations

import resource

import torch
from torch import nn

from parallel.shards import local_shard


def local_bytes(t: torch.Tensor | None) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    local = local_shard(t)
    return local.numel() * local.element_size()


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds (local shards only, not the global tensors)."""
    params = list(model.parameters())
    optim_bytes = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values())
    return {
        "param_bytes": sum(local_bytes(p) for p in params),
        "grad_bytes": sum(local_bytes(p.grad) for p in params),
        "optimizer_bytes": optim_bytes,
    }


def setup_memory(device: torch.device) -> dict[str, int]:
    """Peak host RSS of this process and peak device memory so far (0 on CPU): what building
    the sharded model cost, the number that says whether a big model starts at all."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"peak_rss_bytes": peak_rss, "peak_device_bytes": peak_device}
