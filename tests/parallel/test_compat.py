"""The torch feature checks in parallel/compat.py."""

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from framework.model.args import ModelArgs
from framework.model.moe.router import Router, Routing
from parallel.compat import grouped_mm_supported, register_pytree_dataclass, set_gradient_divide_factor


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


def test_fsdp_param_groups_read_in_both_layouts_of_the_state():
    """torch 2.13 keeps a list `_fsdp_param_groups`; earlier FSDP2 one optional `_fsdp_param_group`."""
    from types import SimpleNamespace

    from parallel.compat import _fsdp_param_groups

    group = object()
    assert _fsdp_param_groups(SimpleNamespace(_fsdp_param_groups=[group])) == [group]
    assert _fsdp_param_groups(SimpleNamespace(_fsdp_param_group=group)) == [group]
    assert _fsdp_param_groups(SimpleNamespace(_fsdp_param_group=None)) == []
    with pytest.raises(RuntimeError, match=r"no FSDP2 parameter groups .* 2.11 to 2.15"):
        _fsdp_param_groups(SimpleNamespace())
