"""The all-to-all dispatcher on real gloo process groups."""

import pytest
import torch

from scripts.benchlib import run_ranks
from tests.parallel.harness import expert_parallel_moe

pytestmark = pytest.mark.slow

E, D = 8, 12


def _ep_setup(world: int, ep_per_node: int):
    return expert_parallel_moe(
        world, ep_per_node, dim=D, num_experts=E, expert_dim=6, top_k=2, num_shared_experts=0, n_groups=2, topk_groups=1
    )


def _identity_round_trip(rank: int, world: int) -> dict:
    from parallel.expert_parallel import AllToAllDispatcher

    moe, _ = _ep_setup(world, ep_per_node=world)
    assert isinstance(moe.dispatcher, AllToAllDispatcher)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank routes its own tokens
    x = torch.randn(37 + rank, D, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(x.shape[0])])
    x_MD, per_local_expert, meta = moe.dispatcher.dispatch(x, idx, E)
    # Identity experts; weights 0.5 + 0.5 are exact in fp32, so the input must come back bit for bit.
    back = moe.dispatcher.combine(x_MD, meta, torch.full(idx.shape, 0.5))
    local_counts = torch.bincount(idx.flatten(), minlength=E)
    total = local_counts.clone()
    torch.distributed.all_reduce(total)
    local = E // world
    mine = total[rank * local : (rank + 1) * local]
    return {"exact": bool(torch.equal(back, x)), "per_local_expert": per_local_expert.equal(mine)}


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_identity_round_trip_is_exact(world):
    result = run_ranks(_identity_round_trip, world)[0]
    assert result == {"exact": True, "per_local_expert": True}


def _layer_matches_full_layer(rank: int, world: int) -> dict:
    """The EP layer's output and input gradient equal the full layer on the same tokens."""
    from framework.model.args import ModelArgs
    from framework.model.moe.layer import MoE
    from parallel.token_dispatch import LocalDispatcher

    moe, full_experts = _ep_setup(world, ep_per_node=world)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(7 + rank), requires_grad=True)
    out, _ = moe(x)
    out.square().sum().backward()

    ref = MoE(ModelArgs(dim=D, num_experts=E, expert_dim=6, top_k=2, num_shared_experts=0, n_groups=2, topk_groups=1))
    ref.load_state_dict({**moe.state_dict(), **{f"experts.{n}": p for n, p in full_experts.items()}})
    ref.dispatcher = LocalDispatcher()
    x_ref = x.detach().clone().requires_grad_()
    out_ref, _ = ref(x_ref)
    out_ref.square().sum().backward()
    return {
        "out": torch.allclose(out, out_ref, rtol=1e-6, atol=1e-6),
        "grad": torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6),
    }


def test_expert_parallel_layer_matches_full_layer():
    assert run_ranks(_layer_matches_full_layer, 2)[0] == {"out": True, "grad": True}


def _node_limited(rank: int, world: int) -> dict:
    """ep=4 over 2 emulated nodes (2 EP ranks each), n_groups=2, topk_groups=1: every
    token's experts sit on one node, so rows cross nodes only for whole tokens."""
    moe, _ = _ep_setup(world, ep_per_node=2)
    x = torch.randn(4, 16, D, generator=torch.Generator().manual_seed(rank))
    moe(x)
    routing = moe.router(x.view(-1, D))
    nodes_TK = routing.topk_idx_TK // (E // 2)  # expert group g lives on node g
    my_node = rank // 2
    expected = int((nodes_TK != my_node).sum())
    return {
        "one_node_per_token": bool((nodes_TK == nodes_TK[:, :1]).all()),
        "counted": moe.dispatcher.cross_node_rows == expected,
        "some_cross": expected > 0,
    }


def test_node_limited_routing_keeps_each_token_on_one_node_and_counts_crossings():
    assert run_ranks(_node_limited, 4)[0] == {"one_node_per_token": True, "counted": True, "some_cross": True}
