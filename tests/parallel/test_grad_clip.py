"""Gradient clipping: the norm over dense and expert grads is the one global L2 norm, whether
the grads are plain tensors or DTensor shards on two different meshes."""

import pytest
import torch
from torch import nn

from parallel.grad_clip import clip_grad_norm
from scripts.benchlib import run_ranks

CPU = torch.device("cpu")


def _params(*shapes: tuple[int, ...], seed: int) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def _norm(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params]).norm()


def test_norm_is_the_l2_norm_of_all_grads_and_clipping_scales_to_max_norm():
    dense, experts = _params((4, 3), (5,), seed=0), _params((2, 3, 4), seed=1)
    before = _norm(dense + experts)
    grads = [p.grad.clone() for p in dense + experts]
    norm = clip_grad_norm(dense, experts, max_norm=1.0, device=CPU)
    torch.testing.assert_close(norm, before)  # the norm before clipping
    assert before > 1.0
    torch.testing.assert_close(_norm(dense + experts), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    for p, g in zip(dense + experts, grads, strict=True):  # one factor for every grad: directions kept
        torch.testing.assert_close(p.grad, g * (1.0 / (before + 1e-6)))


@pytest.mark.parametrize("max_norm", [0.0, float("inf"), 1e6])
def test_no_clipping_when_disabled_or_under_the_limit(max_norm):
    dense, experts = _params((4, 3), seed=0), _params((2, 3, 4), seed=1)
    grads = [p.grad.clone() for p in dense + experts]
    clip_grad_norm(dense, experts, max_norm=max_norm, device=CPU)
    assert all(torch.equal(p.grad, g) for p, g in zip(dense + experts, grads, strict=True))


def test_missing_grads_and_empty_groups_count_as_zero():
    dense, experts = _params((4, 3), seed=0), _params((2, 3), seed=1)
    experts[0].grad = None
    torch.testing.assert_close(clip_grad_norm(dense, experts, 0.0, CPU), _norm(dense))
    torch.testing.assert_close(clip_grad_norm([], [], 0.0, CPU), torch.tensor(0.0))


def test_a_plain_grad_is_refused_where_the_dp_group_would_count_it_once_per_rank():
    """Summed over a dp group of 2 ranks, a replicated plain gradient would count twice: refused
    before any collective (torch's fake process group stands in for the 2 ranks)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dense, experts = _params((4, 3), seed=0), _params((2, 3), seed=1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with pytest.raises(ValueError, match=r"shape \(4, 3\) is a plain tensor.*dp_group of 2 ranks"):
            clip_grad_norm(dense, experts, 1.0, CPU, dp_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _sharded_clip(rank: int, world: int, one_group: bool) -> dict:
    """Dense grads sharded HSDP-style over the (dp_replicate, dp_shard) mesh, expert grads
    over the EP mesh: the global norm must equal the norm of the full grads on one process."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from parallel.layout import resolve_layout
    from parallel.mesh import build_expert_mesh, build_mesh, dp_mesh

    layout = resolve_layout(world, 1, "auto", -1, world)
    dense_mesh, ep_mesh = dp_mesh(build_mesh(layout, CPU)), build_expert_mesh(layout, CPU)["ep"]
    full_dense, full_experts = _params((8, 3), (4,), seed=0), _params((4, 3, 5), seed=1)  # same on every rank

    def shard(full: nn.Parameter, mesh, placements) -> nn.Parameter:
        local = full.grad.chunk(world, dim=0)[rank].clone()
        p = nn.Parameter(DTensor.from_local(torch.zeros_like(local), mesh, placements, run_check=False))
        p.grad = DTensor.from_local(local, mesh, placements, run_check=False)
        return p

    dense = [shard(p, dense_mesh, [Replicate(), Shard(0)]) for p in full_dense]
    experts = [shard(p, ep_mesh, [Shard(0)]) for p in full_experts]
    group = dist.group.WORLD if one_group else None
    norm = clip_grad_norm(dense, experts, max_norm=2.0, device=CPU, dp_group=group)
    clipped = torch.cat([p.grad.full_tensor().flatten() for p in dense + experts])
    return {"norm": norm, "reference": _norm(full_dense + full_experts), "clipped_norm": clipped.norm()}


@pytest.mark.slow
@pytest.mark.parametrize("one_group", [True, False], ids=["one all-reduce over dp", "per mesh dimension"])
def test_global_norm_over_sharded_grads_on_two_meshes_equals_the_single_process_norm(one_group):
    out = run_ranks(_sharded_clip, 2, one_group)
    for rank in out:  # every rank computes the same norm and clips by the same factor
        torch.testing.assert_close(rank["norm"], rank["reference"])
        assert rank["reference"] > 2.0
        torch.testing.assert_close(rank["clipped_norm"], torch.tensor(2.0), rtol=1e-5, atol=1e-5)


def _expert_grads_on_edp_shard_x_ep(rank: int, world: int) -> dict:
    """Expert grads sharded over the 2-D (edp_shard, ep) mesh (FSDP over EP, as at pp=2 x ep=2):
    DTensor's own norm reduction warns that it runs one all-reduce per mesh dimension."""
    import logging

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from parallel.layout import resolve_layout
    from parallel.mesh import build_expert_mesh

    layout = resolve_layout(world, 1, "auto", -1, world)
    mesh = build_expert_mesh(layout, CPU)["edp_shard", "ep"]
    full = _params((4, 3, 5), (2, 6), seed=1)
    experts = []
    for p in full:
        local = p.grad.chunk(world, dim=0)[rank].clone()
        e = nn.Parameter(DTensor.from_local(torch.zeros_like(local), mesh, [Shard(0), Shard(0)], run_check=False))
        e.grad = DTensor.from_local(local, mesh, [Shard(0), Shard(0)], run_check=False)
        experts.append(e)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("torch.distributed.tensor._redistribute").addHandler(Keep())
    norms = [clip_grad_norm([], experts, 0.0, CPU, dp_group=g) for g in (dist.group.WORLD, None)]
    ours = list(records)
    dtensor_norm = torch.nn.utils.get_total_norm([e.grad for e in experts]).full_tensor()  # torch's own way
    return {"norms": norms, "reference": _norm(full), "ours": ours, "dtensor": records[len(ours) :], "d": dtensor_norm}


@pytest.mark.slow
def test_clipping_over_a_2d_expert_mesh_warns_nothing_and_equals_the_full_norm():
    for rank in run_ranks(_expert_grads_on_edp_shard_x_ep, 2):
        assert rank["ours"] == []
        assert any("sequential" in m for m in rank["dtensor"])  # the warning this clipping avoids
        for norm in rank["norms"]:
            torch.testing.assert_close(norm, rank["reference"], rtol=1e-6, atol=0)
        torch.testing.assert_close(rank["norms"][0], rank["d"], rtol=1e-6, atol=0)


def _hsdp_clip(rank: int, world: int) -> dict:
    """HSDP: dense grads Replicate over dp_replicate=2 and Shard over dp_shard=2, experts over
    (edp_replicate, edp_shard, ep): with one all-reduce over all 4 ranks each shard counts once."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from parallel.layout import resolve_layout
    from parallel.mesh import build_expert_mesh, build_mesh, dp_mesh

    layout = resolve_layout(world, 1, 2, -1, 2)
    dense_mesh = dp_mesh(build_mesh(layout, CPU))
    expert_mesh = build_expert_mesh(layout, CPU)["edp_replicate", "edp_shard", "ep"]
    full_dense, full_experts = _params((8, 3), (4,), seed=0), _params((4, 3, 5), seed=1)

    def shard(full: nn.Parameter, mesh, placements, parts: int, index: int) -> nn.Parameter:
        local = full.grad.chunk(parts, dim=0)[index].clone()
        p = nn.Parameter(DTensor.from_local(torch.zeros_like(local), mesh, placements, run_check=False))
        p.grad = DTensor.from_local(local, mesh, placements, run_check=False)
        return p

    shard_rank = dense_mesh.get_local_rank("dp_shard")
    dense = [shard(p, dense_mesh, [Replicate(), Shard(0)], 2, shard_rank) for p in full_dense]
    expert_index = expert_mesh.get_local_rank("ep")  # edp_shard is 1: the ep rank picks the rows
    experts = [shard(p, expert_mesh, [Replicate(), Shard(0), Shard(0)], 2, expert_index) for p in full_experts]
    norms = [clip_grad_norm(dense, experts, 0.0, CPU, dp_group=g) for g in (dist.group.WORLD, None)]
    return {"norms": norms, "reference": _norm(full_dense + full_experts)}


@pytest.mark.slow
def test_hsdp_replicas_count_once_in_the_norm():
    for rank in run_ranks(_hsdp_clip, 4):
        for norm in rank["norms"]:
            torch.testing.assert_close(norm, rank["reference"], rtol=1e-6, atol=0)
