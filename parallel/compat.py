"""Every check for a torch feature that differs across the supported range (2.11 to 2.15).

Feature detection, never version strings: each check asks torch whether the thing exists
or runs. Everything else imports these helpers instead of probing torch on its own.

What was compared (torch 2.11.0 and 2.13.0 sources): FSDP2's search for a unit's output
tensors (2.11 uses `tree_flatten`, which skips unregistered dataclasses; 2.13 walks
dataclasses too), `torch._grouped_mm` (a private op whose CPU/CUDA kernels depend on the
build), FSDP2's divide-factor and forced-SUM reduction (present and identical in both), and
the device-mesh, DTensor, functional-collective and DCP staging APIs this package uses
(present and identical in both, so they need no check). FSDP2's per-unit state for a gradient
reduction run by hand (torch 2.13 source; the older single `_fsdp_param_group` found in earlier
FSDP2 sources is read too): see reduce_fsdp_gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.utils._pytree as pytree
from torch import nn

T = TypeVar("T", bound=type)


def register_pytree_dataclass(cls: T) -> T:
    """Make a dataclass a pytree node, so every torch version sees the tensors inside it.

    FSDP2 hangs its pre-backward hook (the re-gather of a unit's weights before the unit's
    backward) on the output tensors it finds. torch 2.11 finds them with `tree_flatten`,
    which treats an unregistered dataclass as one opaque leaf: the unit then has no hook,
    its weight stays freed after forward, and backward fails with "setStorage: ... storage
    of size 0". Registered, the dataclass flattens into its fields on every version."""
    if cls not in pytree.SUPPORTED_NODES:  # once: a module imported again must not re-register
        pytree.register_dataclass(cls)
    return cls


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Does `torch._grouped_mm` run (forward and the weight-gradient form) for this device
    and dtype? It is private: it exists only in recent builds, and its CPU and CUDA kernels
    cover different dtypes and GPU architectures. Probed once per device/dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(32, 16, device=device_type, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        offs = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)
        gw = torch._grouped_mm(x.t(), y, offs=offs)
        return bool(torch.allclose(y.float(), torch.full_like(y, 16).float())) and gw.shape == (2, 16, 16)
    except (RuntimeError, NotImplementedError):
        return False


def set_gradient_divide_factor(module: nn.Module, factor: float, shard_group_size: int) -> None:
    """Divide an FSDP2 unit's reduced gradients by `factor` instead of its own group size.

    A custom factor makes FSDP2 reduce with PREMUL_SUM, which gloo lacks; forced SUM then
    divides after the collective instead. Not on a 1-rank shard group: there FSDP2 (2.11 to
    2.13 at least) divides once while copying (no collective runs) and again after, so the
    gradient would be divided twice; without forced SUM no collective needs PREMUL_SUM."""
    for name in ("set_gradient_divide_factor", "set_force_sum_reduction_for_comms"):
        if not hasattr(module, name):
            raise RuntimeError(
                f"this torch ({torch.__version__}) has no FSDPModule.{name}; moe-launch supports torch 2.11 to 2.15"
            )
    module.set_gradient_divide_factor(float(factor))
    if shard_group_size > 1:
        module.set_force_sum_reduction_for_comms(True)


def local_shape_and_global_offset(param) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of the DTensor `param`, strided
    FSDP-over-EP shards included. The helper is private in torch (2.4 onwards, same signature
    in 2.11 and 2.13); sharded init (parallel/sharded_init.py) is its one user."""
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


def _fsdp_param_groups(state) -> list:
    """A unit's FSDP2 parameter groups: a list `_fsdp_param_groups` in torch 2.13, one optional
    `_fsdp_param_group` in earlier FSDP2 releases."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    if not hasattr(state, "_fsdp_param_group"):
        raise RuntimeError(
            f"this torch ({torch.__version__}) has no FSDP2 parameter groups where moe-launch looks for them "
            "(_fsdp_param_groups or _fsdp_param_group); moe-launch supports torch 2.11 to 2.15"
        )
    group = state._fsdp_param_group
    return [] if group is None else [group]


def defer_fsdp_gradient_reduction(units: Sequence[nn.Module]) -> None:
    """For the backwards of one pipeline step: FSDP2 `units` keep their gradients unreduced and stay
    unsharded after a backward, so a weight-gradient pass (W) that runs after the input-gradient
    one (B) still finds them; reduce_fsdp_gradients ends the step. (Public FSDPModule setters.)"""
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
        unit.set_is_last_backward(False)


def fold_fsdp_gradients(units: Sequence[nn.Module]) -> None:
    """Move the gradients a weight-gradient pass (W) left in FSDP2 `units`' unsharded parameters into
    their accumulators in the reduce dtype (fp32 under bf16 compute), as FSDP2's own post-backward
    does after each backward without a reduction: W runs outside the hooks that would. Private
    FSDPParam methods (torch 2.13); where absent the gradients accumulate in the compute dtype."""
    for unit in units:
        for group in _fsdp_param_groups(unit._get_fsdp_state()):
            for param in group.fsdp_params:
                if hasattr(param, "to_accumulated_grad_if_needed"):
                    param.accumulate_unsharded_grad_if_needed()
                    param.to_accumulated_grad_if_needed()


def reduce_fsdp_gradients(units: Sequence[nn.Module]) -> None:
    """After the last backward of a pipeline step: reduce (reduce-scatter, and all-reduce under HSDP)
    every unit's accumulated gradients once, reshard it, and let FSDP2 finish its backward, as
    torch.distributed.pipelining's PipelineStage.perform_reduce_grad does: each parameter group's
    `post_backward()`, then the root state's `_root_post_backward_final_callback()` (private; the
    same names in the FSDP2 sources read, torch 2.13 and earlier). Every rank holding the same
    stages calls this with the same units in the same order, so the collectives line up."""
    states = []
    for unit in units:
        unit.set_requires_gradient_sync(True, recurse=False)
        unit.set_reshard_after_backward(True, recurse=False)
        unit.set_is_last_backward(True)
        state = unit._get_fsdp_state()
        states.append(state)
        for group in _fsdp_param_groups(state):
            group.post_backward()
    if states:
        everyone = getattr(states[0]._state_ctx, "all_states", states)
        root = next((s for s in everyone if getattr(s, "_is_root", False)), states[0])
        root._root_post_backward_final_callback()
