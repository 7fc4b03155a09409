"""The device meshes built from a layout, on one process: torch's fake process group stands
in for 8 ranks, so the rank grids can be read without starting any."""

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from parallel.layout import resolve_layout
from parallel.mesh import build_expert_mesh, build_groups, build_mesh, dp_mesh, dp_rank_and_size, expert_dp_mesh

CPU = torch.device("cpu")


@pytest.fixture
def as_rank():
    def init(rank: int, world: int) -> None:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def test_hsdp_with_ep_inside_the_shard_group(as_rank):
    as_rank(3, 8)
    layout = resolve_layout(8, 1, 2, 4, 2)  # 2 replicas x 4 shards, ep 2
    mesh, expert_mesh = build_mesh(layout, CPU), build_expert_mesh(layout, CPU)
    assert mesh.mesh.tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7]]]
    assert dp_mesh(mesh).mesh.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dp_rank_and_size(mesh) == (3, 8)
    assert tuple(expert_mesh.mesh.shape) == (1, 2, 2, 2)  # pp, edp_replicate, edp_shard, ep
    assert expert_mesh["ep"].mesh.tolist() == [2, 3]  # an EP group: neighbouring ranks
    # Rank 3 holds the second half of the experts, as do 1, 5 and 7: those shard (1, 3) and
    # replicate across the two replica groups.
    assert expert_dp_mesh(expert_mesh).mesh.tolist() == [[1, 3], [5, 7]]


def test_ep_spanning_replicas_leaves_one_copy_of_each_expert(as_rank):
    as_rank(5, 8)
    layout = resolve_layout(8, 1, 2, 4, 8)
    expert_mesh = build_expert_mesh(layout, CPU)
    assert tuple(expert_mesh.mesh.shape) == (1, 1, 1, 8)
    assert expert_mesh["ep"].mesh.tolist() == list(range(8))
    assert expert_dp_mesh(expert_mesh).mesh.tolist() == [[5]]


@pytest.mark.parametrize("pp, new_groups, dp_ranks", [(1, 0, list(range(8))), (2, 1, [0, 1, 2, 3])])
def test_data_parallel_group_is_the_world_without_a_pipeline(as_rank, pp, new_groups, dp_ranks):
    """pp=1: the data-parallel ranks are every rank, so no second communicator is made for them;
    pp=2: rank 1 joins its stage's data-parallel group (the process's groups count only its own)."""
    as_rank(1, 8)
    mesh = build_mesh(resolve_layout(8, pp, 1, 8 // pp, 1), CPU)
    mesh.get_group("pp")  # the mesh's own groups, made before counting
    before = len(dist.distributed_c10d._world.pg_map)
    groups = build_groups(mesh)
    assert len(dist.distributed_c10d._world.pg_map) - before == new_groups
    assert (groups.dp is dist.group.WORLD) == (pp == 1)
    assert dist.get_process_group_ranks(groups.dp) == dp_ranks
