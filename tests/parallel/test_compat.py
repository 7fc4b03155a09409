"""The torch feature checks in parallel/compat.py."""

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from framework.model.args import ModelArgs
from framework.model.moe.router import Router, Routing
from parallel.compat import (
    grouped_mm_supported,
    register_pytree_dataclass,
    set_gradient_divide_factor,
    set_unshard_in_backward,
)


def test_routing_flattens_into_its_tensors_as_torch_2_11_fsdp_searches_outputs():
    """FSDP2 on torch 2.11 hangs its pre-backward hook on the tensors tree_flatten finds."""
    router = Router(ModelArgs(dim=8, num_experts=4, top_k=2, n_groups=1, topk_groups=1))
    nn.init.normal_(router.weight)
    routing = router(torch.randn(5, 8))
    leaves, _ = tree_flatten(routing)
    assert len(leaves) == 3 and all(isinstance(t, torch.Tensor) for t in leaves)
    assert sum(t.requires_grad for t in leaves) == 2  # gate weights and scores; indices carry no grad
    assert register_pytree_dataclass(Routing) is Routing  # registering twice is harmless


def test_grouped_mm_probe_answers_per_device_and_dtype():
    assert grouped_mm_supported("cpu", torch.float32) == hasattr(torch, "_grouped_mm")
    assert grouped_mm_supported("meta", torch.float32) in (True, False)  # no exception escapes


def test_divide_factor_on_a_module_without_fsdp_says_what_is_missing():
    with pytest.raises(RuntimeError, match=r"has no FSDPModule.set_gradient_divide_factor; .* 2.11 to 2.15"):
        set_gradient_divide_factor(nn.Linear(2, 2), 4.0, 2)
    with pytest.raises(RuntimeError, match=r"has no FSDPModule.set_unshard_in_backward; .* 2.11 to 2.15"):
        set_unshard_in_backward(nn.Embedding(2, 2), False)


def test_fsdp_param_groups_read_in_both_layouts_of_the_state():
    """torch 2.13 keeps a list `_fsdp_param_groups`; earlier FSDP2 one optional `_fsdp_param_group`."""
    from types import SimpleNamespace

    from parallel.compat import fsdp_param_groups

    group = object()
    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_groups=[group])) == [group]
    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_group=group)) == [group]
    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_group=None)) == []
    with pytest.raises(RuntimeError, match=r"no FSDP2 parameter groups .* 2.11 to 2.15"):
        fsdp_param_groups(SimpleNamespace())


def test_fsdp_helpers_find_states_groups_and_root_on_a_real_fully_sharded_model():
    """The fsdp_* helpers on this torch's FSDP2 (gloo, one process): states, groups, the root,
    training states read and written back, and the end-of-backward callback held and run."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parallel.compat import (
        fsdp_param_groups,
        fsdp_root_state,
        fsdp_state,
        fsdp_training_states,
        hold_fsdp_final_callback,
        run_fsdp_final_callback,
        set_fsdp_training_states,
    )

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert fsdp_state(nn.Linear(2, 2)) is None
        inner, outer = fsdp_state(model[0]), fsdp_state(model)
        assert inner is not None and outer is not None and inner is not outer
        held = {id(p) for g in fsdp_param_groups(inner) for fp in g.fsdp_params for p in [fp.sharded_param]}
        assert held == {id(p) for p in model[0].parameters()}
        assert fsdp_root_state([inner, outer]) is None  # marked at lazy init, on the first forward

        model(torch.randn(3, 4)).sum().backward()
        assert fsdp_root_state([inner]) is outer  # found through the shared context's all_states
        idle = fsdp_training_states([inner, outer])
        assert len(idle) == 2 and all(len(groups) == 1 for _, groups in idle)
        other = [(idle[0][0].FORWARD, [idle[0][0].FORWARD]), idle[1]]
        set_fsdp_training_states([inner, outer], other)
        assert fsdp_training_states([inner, outer]) == other
        set_fsdp_training_states([inner, outer], idle)

        hold_fsdp_final_callback(outer, True)  # the callback is not queued: gradients stay unreduced
        model(torch.randn(3, 4)).sum().backward()
        assert fsdp_training_states([inner]) != [(idle[0][0].IDLE, [idle[0][0].IDLE])]
        hold_fsdp_final_callback(outer, False)
        run_fsdp_final_callback(outer)
        assert fsdp_training_states([inner, outer]) == idle  # every unit reset, as FSDP2's own end
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
