"""Counting host synchronisations: the calls that make the CPU wait for the GPU's queue.

Each one stalls the host until the device has finished all work queued before it, so
inside the training step they decide GPU throughput. On CUDA, torch's sync debug mode
reports every one (kernels that sync internally too). On CPU nothing waits, so the
counter records the Python calls that would wait on a GPU, and the ops whose CUDA kernels
read a result back to size their output, so a test on CPU keeps them from creeping back.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
import warnings
from collections.abc import Iterator

import torch

# Tensor methods that hand a value (or a copy) to the host: each waits for the device.
_READBACK_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")


class HostSyncs:
    """What a `count_host_syncs()` block saw: one entry per sync, named by the calling line."""

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def record(self, what: str) -> None:
        """Count a call made by this project's code; torch's own calls (on host tensors such
        as the optimizer's step counters) are left to CUDA's debug mode to judge."""
        caller = traceback.extract_stack(limit=3)[0].filename.replace("\\", "/")
        if "/torch/" not in caller:
            self.sites[f"{what} at {_caller()}"] += 1

    def __repr__(self) -> str:
        lines = [f"{n} x {site}" for site, n in self.sites.most_common()]
        return f"HostSyncs({self.total}: " + "; ".join(lines) + ")"


def _caller() -> str:
    """The innermost frame of this project (not torch, not this file) on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith("framework/host_sync.py") or "/_pytest/" in path:
            continue
        return f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "torch internals"


def _wrap_method(name: str, syncs: HostSyncs):
    original = getattr(torch.Tensor, name)

    def counted(self, *args, **kwargs):
        if self.device.type != "meta":
            syncs.record(f"Tensor.{name}")
        return original(self, *args, **kwargs)

    return original, counted


def _wrap_bincount(syncs: HostSyncs):
    original = torch.bincount

    def counted(*args, **kwargs):
        syncs.record("torch.bincount")  # the CUDA kernel reads max() and min() back
        return original(*args, **kwargs)

    return original, counted


def _wrap_repeat_interleave(syncs: HostSyncs):
    original = torch.repeat_interleave

    def counted(input, repeats=None, *args, **kwargs):
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            syncs.record("torch.repeat_interleave without output_size")  # sums repeats on the host
        elif repeats is None and kwargs.get("output_size") is None:
            syncs.record("torch.repeat_interleave without output_size")
        return original(input, repeats, *args, **kwargs)

    return original, counted


def _wrap_nonzero(syncs: HostSyncs):
    original = torch.nonzero

    def counted(*args, **kwargs):
        syncs.record("torch.nonzero")  # output size is data-dependent
        return original(*args, **kwargs)

    return original, counted


def step_flags(loss: torch.Tensor, grad_norm: torch.Tensor, stop_requested: bool) -> torch.Tensor:
    """[non-finite loss or gradient, stop requested] as one float tensor on the loss's device,
    built without reading anything back (the caller all-reduces it, then reads it once)."""
    non_finite = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    # torch.full, not torch.tensor: a Python value copied to the GPU would wait for its queue.
    stop = torch.full((), float(stop_requested), device=loss.device)
    return torch.stack([non_finite.float(), stop])


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count the host synchronisations inside the block. With CUDA in use, every one torch's
    sync debug mode reports (Python calls and kernels that sync inside); else this thread's
    Python calls that would sync on a GPU. Not for production: it patches torch for the
    duration of the block."""
    syncs = HostSyncs()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        previous_mode = torch.cuda.get_sync_debug_mode()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                yield syncs
        finally:
            torch.cuda.set_sync_debug_mode(previous_mode)
        for w in caught:
            if "synchroniz" in str(w.message):
                syncs.sites[f"cuda sync at {w.filename.rsplit('/', 1)[-1]}:{w.lineno}"] += 1
        return
    patches = [(torch.Tensor, name, *_wrap_method(name, syncs)) for name in _READBACK_METHODS]
    patches.append((torch, "bincount", *_wrap_bincount(syncs)))
    patches.append((torch, "repeat_interleave", *_wrap_repeat_interleave(syncs)))
    patches.append((torch, "nonzero", *_wrap_nonzero(syncs)))
    for owner, name, _, counted in patches:
        setattr(owner, name, counted)
    try:
        yield syncs
    finally:
        for owner, name, original, _ in patches:
            setattr(owner, name, original)
