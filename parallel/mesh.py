"""The device mesh: one named mesh built from the resolved layout, sub-meshes by name."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.layout import Layout


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    """Dimensions outermost first: pp, dp_replicate (across nodes), dp_shard (within)."""
    return init_device_mesh(
        device.type,
        (layout.pp, layout.dp_replicate, layout.dp_shard),
        mesh_dim_names=("pp", "dp_replicate", "dp_shard"),
    )


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 2-D (dp_replicate, dp_shard) mesh FSDP2 shards over: HSDP when replicate > 1."""
    return mesh["dp_replicate", "dp_shard"]


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """Which slice of the global batch this rank reads, and how many slices there are."""
    sub = dp_mesh(mesh)
    replicate, shard = sub.get_local_rank("dp_replicate"), sub.get_local_rank("dp_shard")
    return replicate * sub.size(1) + shard, sub.size()
