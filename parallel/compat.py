"""Every check for a torch feature that differs across the supported range (2.11 to 2.15).

Feature detection, never version strings: each check asks torch whether the thing exists
or runs. Everything else imports these helpers instead of probing torch on its own.

What was compared (torch 2.11.0 and 2.13.0 sources): FSDP2's search for a unit's output
tensors (2.11 uses `tree_flatten`, which skips unregistered dataclasses; 2.13 walks
dataclasses too), `torch._grouped_mm` (a private op whose CPU/CUDA kernels depend on the
build), FSDP2's divide-factor and forced-SUM reduction (present and identical in both), and
the device-mesh, DTensor, functional-collective and DCP staging APIs this package uses
(present and identical in both, so they need no check). FSDP2's private per-unit state (the
pipeline's hand-run gradient reduction and its overlapped F&B): see the fsdp_* helpers below.
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


def set_unshard_in_backward(module: nn.Module, unshard: bool) -> None:
    """Whether FSDP2 gathers the unit `module`'s weights before its backward (False for a unit whose
    backward reads no weight, e.g. an embedding; public FSDPModule setter, present 2.11 to 2.13)."""
    if not hasattr(module, "set_unshard_in_backward"):
        raise RuntimeError(
            f"this torch ({torch.__version__}) has no FSDPModule.set_unshard_in_backward; moe-launch supports "
            "torch 2.11 to 2.15"
        )
    module.set_unshard_in_backward(unshard)


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


# FSDP2's private per-unit state. Every read or write of it in moe-launch goes through the helpers
# below (the pipeline's B/W split and its overlapped F&B use them). Names checked in the torch 2.11
# and 2.13 sources, unchanged between them except where noted; a unit is an FSDPModule (fully_shard):
#   FSDPModule._get_fsdp_state()            -> the unit's FSDPState
#   FSDPState._fsdp_param_groups (2.13)     a list of FSDPParamGroup
#   FSDPState._fsdp_param_group  (2.11)     one optional FSDPParamGroup
#   FSDPState._training_state, FSDPParamGroup._training_state   (TrainingState: IDLE, FORWARD, ...)
#   FSDPState._state_ctx.all_states, FSDPState._is_root         (the root state runs the final callback)
#   FSDPState._state_ctx.post_backward_final_callback_queued    (True: the root does not queue it again)
#   FSDPState._root_post_backward_final_callback()              (post-backward and reset of every unit)
# A later torch (to 2.15) that renames one of them fails loudly here, naming the attribute.


def _missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"this torch ({torch.__version__}) has no FSDP2 {what} where moe-launch looks for it; "
        "moe-launch supports torch 2.11 to 2.15 (parallel/compat.py)"
    )


def fsdp_state(module: nn.Module):
    """The FSDP2 state of `module`, or None when it is not an FSDP2 unit (not fully_shard'ed)."""
    get = getattr(module, "_get_fsdp_state", None)
    return get() if get is not None else None


def fsdp_param_groups(state) -> list:
    """A unit's FSDP2 parameter groups: the list `_fsdp_param_groups` (torch 2.13), or the one
    optional `_fsdp_param_group` (2.11) as a list of zero or one."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    if not hasattr(state, "_fsdp_param_group"):
        raise _missing("parameter groups (_fsdp_param_groups or _fsdp_param_group)")
    group = state._fsdp_param_group
    return [] if group is None else [group]


def fsdp_root_state(states: Sequence):
    """The root FSDP2 state of the tree `states` belong to (it runs the end-of-backward callback), found
    in their shared context's `all_states` (filled at FSDP2's lazy init, on the first forward); None
    when `states` is empty or no state is marked root yet."""
    if not states:
        return None
    everyone = getattr(states[0]._state_ctx, "all_states", None) or states
    return next((s for s in everyone if getattr(s, "_is_root", False)), None)


def fsdp_training_states(states: Sequence) -> list:
    """Each state's training state and its parameter groups' (TrainingState values), to restore
    later with set_fsdp_training_states."""
    return [(s._training_state, [g._training_state for g in fsdp_param_groups(s)]) for s in states]


def set_fsdp_training_states(states: Sequence, saved: list) -> None:
    """Put back what fsdp_training_states read from the same `states`."""
    for state, (own, groups) in zip(states, saved, strict=True):
        state._training_state = own
        for group, group_state in zip(fsdp_param_groups(state), groups, strict=True):
            group._training_state = group_state


def hold_fsdp_final_callback(root, held: bool) -> None:
    """While held, FSDP2 does not queue the root's end-of-backward callback (it believes it queued);
    the caller then runs it itself with run_fsdp_final_callback."""
    ctx = root._state_ctx
    if not hasattr(ctx, "post_backward_final_callback_queued"):
        raise _missing("post_backward_final_callback_queued")
    ctx.post_backward_final_callback_queued = held


def run_fsdp_final_callback(root) -> None:
    """FSDP2's end of backward, run by hand on the root state: each unit's post-backward (reduction
    and reshard where still due) and the reset of every unit's training state."""
    root._root_post_backward_final_callback()


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
        for group in fsdp_param_groups(fsdp_state(unit)):
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
        state = fsdp_state(unit)
        states.append(state)
        for group in fsdp_param_groups(state):
            group.post_backward()
    if states:
        run_fsdp_final_callback(fsdp_root_state(states) or states[0])
