"""The device meshes: one for dense weights and data, one for experts, over the same ranks.

Dense: (pp, dp_replicate, dp_shard). Experts regroup the same data-parallel ranks as
(pp, edp_replicate, edp_shard, ep), ep innermost so an expert-parallel group is a run of
neighbouring ranks (the same node where it fits), and edp_* shard/replicate each expert.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
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


@dataclass(frozen=True)
class MeshGroups:
    """The process groups reductions name; nothing reduces over the default group.

    world: every rank (agreeing on stop/skip, the job's measured peak); dp: the ranks that
    hold the same pipeline stage (losses, expert loads, evaluation); pp: one replica's stages.
    """

    world: dist.ProcessGroup
    dp: dist.ProcessGroup
    pp: dist.ProcessGroup


def build_groups(mesh: DeviceMesh) -> MeshGroups:
    """Every rank must call this (new groups are collective), in the same order. Without a
    pipeline the data-parallel ranks are the world: dp is the default group, not a second
    communicator over the same ranks."""
    ranks_PRS = mesh.mesh
    pp = ranks_PRS.shape[0]
    if pp == 1:
        dp_group = dist.group.WORLD
    else:
        dp_group, _ = dist.new_subgroups_by_enumeration([ranks_PRS[i].flatten().tolist() for i in range(pp)])
    return MeshGroups(world=dist.group.WORLD, dp=dp_group, pp=mesh.get_group("pp"))


def warm_up(groups: Iterable[dist.ProcessGroup | None], device: torch.device) -> None:
    """One one-element all-reduce on each group (None: this rank is in none), every member taking
    part, in the order given (the same on every rank), before a pipeline's first step.

    torch's batch_isend_irecv requires that, if it is a group's first collective, every rank of
    the group take part; the pipeline's first batch on its group involves two ranks (at pp=4, two of
    four). On NCCL framework/distributed.py passes device_id to init_process_group, which connects
    the default communicator at once, and torch (checked in 2.13's distributed_c10d: new_group
    inherits the bound device; _new_process_group_helper splits with ncclCommSplit, non-members
    taking part with a no-color split, then eager_connect_single_device; DeviceMesh uses
    split_group when the default group is bound, since 2.6) creates every later group connected,
    so the communicator exists before the first batch. This all-reduce makes the first batch not
    the group's first collective on any torch version or creation path all the same, and a group
    that cannot connect fails here, at setup, instead of inside a step. Cost: one all-reduce each."""
    probe = torch.zeros(1, device=device)
    for group in groups:
        if group is not None:
            dist.all_reduce(probe, group=group)
