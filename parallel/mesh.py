"""The device meshes: one for dense weights and data, one for experts, over the same ranks.

Dense: (pp, dp_replicate, dp_shard). Experts regroup the same data-parallel ranks as
(pp, edp_replicate, edp_shard, ep), ep innermost so an expert-parallel group is a run of
neighbouring ranks (the same node where it fits), and edp_* shard/replicate each expert.
"""

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


def build_expert_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    """Data-parallel rank d = replicate * dp_shard + shard splits as (d // ep, d % ep):
    the same ranks as the dense mesh, grouped by which experts they hold."""
    ranks = torch.arange(layout.world_size).view(layout.pp, layout.edp_replicate, layout.edp_shard, layout.ep)
    return DeviceMesh(device.type, ranks, mesh_dim_names=("pp", "edp_replicate", "edp_shard", "ep"))


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 2-D (dp_replicate, dp_shard) mesh FSDP2 shards over: HSDP when replicate > 1."""
    return mesh["dp_replicate", "dp_shard"]


def expert_dp_mesh(expert_mesh: DeviceMesh) -> DeviceMesh:
    """The ranks holding the same experts: FSDP2 shards experts over edp_shard only."""
    return expert_mesh["edp_replicate", "edp_shard"]


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    """Which slice of the global batch this rank reads, and how many slices there are."""
    sub = dp_mesh(mesh)
    replicate, shard = sub.get_local_rank("dp_replicate"), sub.get_local_rank("dp_shard")
    return replicate * sub.size(1) + shard, sub.size()
