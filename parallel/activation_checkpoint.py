"""Activation checkpointing of a model's blocks (train.activation_checkpointing): none, full (keep
each block's input, recompute the rest in the backward) or selective (also keep matmul, attention
and all-to-all outputs), applied by patching each block's forward, so parameter names never change.

Layers that count something in their forward (expert loads) ask `is_recomputing()` so that the
backward's rerun of a block does not count twice.

The rerun happens once per checkpointed call, whatever the number of backward passes that unpack
its saved tensors: a pipeline's split backward (parallel/pipeline/backward_split.py) runs B, which
reruns the block, and later W, which reuses what the rerun saved. torch.utils.checkpoint cannot do
this (it reruns once per backward call, or refuses a second unpack inside a GraphExecGroup, and
autograd's nodes unpack every saved tensor however few gradients they compute), so the
non-reentrant checkpoint here is our own: saved-tensor hooks that pack a slot, a rerun on the first
unpack that fills the slots still alive, and each recomputed tensor freed with the node that saved it.

"selective" keeps the outputs of the ops in _SAVED_OPS in a first-in-first-out queue per op (and
input shapes) and hands them back, in order, when the backward reruns the block. torch's own
create_selective_checkpoint_contexts indexes every op instead, and FSDP2's hooks of the units
nested in a block (router, experts) run different ops in the rerun than in the forward (a root
pre-forward), which it refuses or, worse, answers with another op's cached tensor.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.utils._pytree import tree_map

import parallel.all_to_all  # noqa: F401  (registers moe_launch::all_to_all, kept by "selective")
from parallel.compat import detach_below_autograd, ops_that_exist, torch_dispatch_mode
from parallel.plan import ACTIVATION_CHECKPOINTING

# What "selective" keeps (the memory planner's model of it, parallel/plan.py): matmuls (the
# grouped expert GEMM included), attention kernels and the expert all-to-all's output.
_SAVED_OPS = ops_that_exist(
    "aten.mm",
    "aten.addmm",
    "aten.bmm",
    "aten._grouped_mm",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "moe_launch.all_to_all",  # parallel/all_to_all.py: every expert exchange, counts included
)

# Per thread: on CUDA the backward (and so the recomputation) runs on autograd's device thread
# while the main thread may already run another micro-batch's forward.
_state = threading.local()


def is_recomputing() -> bool:
    """True while a checkpointed block's forward reruns inside the backward."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def _recomputing(inner: AbstractContextManager) -> Iterator[None]:
    """checkpoint's recompute context (its public hook into the rerun), flagged for is_recomputing."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with inner:
            yield
    finally:
        _state.depth -= 1


def _key(func, args) -> tuple:
    """An op and its inputs' shapes and dtypes: a one-off op in the forward alone (a kernel probe
    on first use) cannot shift the outputs handed to the rerun."""
    return (func, *((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor)))


class _KeepOutputs(torch_dispatch_mode()):
    """In the forward: runs every op, and keeps (detached) the outputs of the ops in _SAVED_OPS."""

    def __init__(self, kept: dict):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in _SAVED_OPS:
            # With its version: a kept output changed in place later would be stale in the rerun.
            self.kept[_key(func, args)].append(tree_map(lambda x: _Kept(x) if isinstance(x, torch.Tensor) else x, out))
        return out


class _ReuseOutputs(torch_dispatch_mode()):
    """In the rerun: an op in _SAVED_OPS returns its kept output (same op, same order) instead of
    running (an all-to-all is not sent again); every other op runs."""

    def __init__(self, kept: dict):
        super().__init__()
        self.kept = kept

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _SAVED_OPS:
            kept = self.kept[_key(func, args)]
            if not kept:
                raise RuntimeError(f"selective activation checkpointing: {func} ran more often in the rerun")
            return tree_map(lambda x: x.get(func) if isinstance(x, _Kept) else x, kept.popleft())
        return func(*args, **(kwargs or {}))


class _Kept:
    """A kept output (detached: it shares its data and version counter, not its graph)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = detach_below_autograd(tensor), tensor._version

    def get(self, func) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(f"selective activation checkpointing: {func}'s output was changed in place later")
        return self.tensor


def _full_contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
    return nullcontext(), _recomputing(nullcontext())


def _selective_contexts() -> tuple[AbstractContextManager, AbstractContextManager]:
    kept: dict = defaultdict(deque)  # per checkpointed call: (op, shapes) -> its outputs, in order
    return _KeepOutputs(kept), _recomputing(_ReuseOutputs(kept))


class _Slot:
    """What the forward saves in place of a tensor; the rerun fills it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self):
        self.tensor: torch.Tensor | None = None

    def release(self) -> None:
        """Free the recomputed tensor before the node that saved it dies: a split backward's B
        ran that node, and W never will (parallel/pipeline/backward_split.py)."""
        self.tensor = None


class _Checkpointed:
    """One checkpointed call: its inputs, RNG and autocast state, and a slot per saved tensor."""

    def __init__(self, forward: Callable, args: tuple, kwargs: dict, recompute_context: AbstractContextManager):
        self.forward, self.args, self.kwargs, self.recompute_context = forward, args, kwargs, recompute_context
        self.slots: list[weakref.ref] = []
        self.rerun_done = False
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.device_type = tensors[0].device.type if tensors else "cpu"
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = None
        if self.device_type != "cpu" and hasattr(torch.get_device_module(self.device_type), "get_rng_state"):
            self.device_rng = torch.get_device_module(self.device_type).get_rng_state()
        self.autocast = {
            d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in {"cpu", self.device_type}
        }

    def pack(self, tensor: torch.Tensor) -> _Slot:
        slot = _Slot()
        self.slots.append(weakref.ref(slot))
        return slot

    def unpack(self, slot: _Slot) -> torch.Tensor:
        if not self.rerun_done:
            self.rerun_done = True
            self._rerun()
        if slot.tensor is None:
            raise RuntimeError("activation checkpointing: a saved tensor was not recomputed")
        return slot.tensor

    def _rerun(self) -> None:
        """Run the forward again; every tensor it saves fills the next slot (if that slot's node
        still lives). The rerun's own graph is dropped: only its saved tensors are used."""
        saved = 0

        def fill(tensor: torch.Tensor) -> None:
            nonlocal saved
            if saved >= len(self.slots):
                raise RuntimeError(f"activation checkpointing: the rerun saved more tensors than the forward ({saved})")
            slot = self.slots[saved]()
            saved += 1
            if slot is not None:
                slot.tensor = tensor.detach() if tensor.requires_grad else tensor

        def never(_) -> None:
            raise RuntimeError("activation checkpointing: the rerun's own graph is never differentiated")

        args = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in self.args]
        devices = [torch.get_device_module(self.device_type).current_device()] if self.device_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                torch.get_device_module(self.device_type).set_rng_state(self.device_rng)
            with contextlib.ExitStack() as stack:
                for device, (enabled, dtype) in self.autocast.items():
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
                stack.enter_context(torch.enable_grad())
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(fill, never))
                stack.enter_context(self.recompute_context)
                self.forward(*args, **self.kwargs)
        if saved != len(self.slots):
            raise RuntimeError(
                f"activation checkpointing: the forward saved {len(self.slots)} tensors, its rerun {saved}"
            )


def _checkpointed(forward: Callable, context_fn: Callable) -> Callable:
    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is kept anyway
            return forward(*args, **kwargs)
        forward_context, recompute_context = context_fn()
        call = _Checkpointed(forward, args, kwargs, recompute_context)
        with torch.autograd.graph.saved_tensors_hooks(call.pack, call.unpack), forward_context:
            return forward(*args, **kwargs)

    checkpointed_forward.__wrapped__ = forward
    return checkpointed_forward


def apply_activation_checkpointing(blocks: Iterable[nn.Module], mode: str) -> None:
    """Checkpoint each of `blocks` (before sharding): its forward becomes the original one run under
    saved-tensor hooks that keep nothing but its inputs (non-reentrant checkpointing, one rerun in
    the backward). No module is added, so names stay the same."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing={mode}: allowed: {', '.join(ACTIVATION_CHECKPOINTING)}")
    if mode == "none":
        return
    context_fn = _selective_contexts if mode == "selective" else _full_contexts
    for block in blocks:
        if hasattr(block.forward, "__wrapped__"):
            raise ValueError(f"{type(block).__name__} is already checkpointed")
        block.forward = _checkpointed(block.forward, context_fn)
