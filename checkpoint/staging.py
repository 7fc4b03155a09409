"""Copies a state dict into reused host buffers for async save, off the training thread's path.

One stager for CPU and CUDA tensors. CPU tensors are copied on a background thread with
`Tensor.copy_`, which releases the GIL (DCP's DefaultStager copies with
`UntypedStorage.copy_`, which holds it: on CPU it stalled training almost as long as a
foreground copy). CUDA tensors go into pinned host buffers with non-blocking copies on a side
stream, ordered after the compute stream's work so far; `fence()` makes the compute stream
wait for them (no host block) and waits for the CPU copies. (DCP's own stager raised
`KeyError: <class 'type'>` on torch 2.11+cu130.) Buffers are kept per state-dict entry and
reused by every later save.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.tensor import DTensor


class HostStager:
    """DCP's AsyncStager protocol: stage() returns a Future of the staged state dict."""

    should_synchronize_after_execute = False  # DCP need not wait for staging after starting the write

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-stage")
        self._buffers: dict[str, torch.Tensor] = {}
        self._wrappers: dict[str, tuple[torch.Tensor, DTensor]] = {}  # (buffer, DTensor over it), reused
        self._host_copied: Future | None = None
        self._device_copied = None  # a torch.cuda.Event after the side stream's copies
        self._side_stream = None
        self._future: Future | None = None

    def stage(self, state_dict: dict) -> Future:
        """Build the staged dict over host buffers now (cheap), copy into them in the background."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        staged = self._mirror(state_dict, "", pairs)
        device_pairs = [(src, dst) for src, dst in pairs if src.device.type == "cuda"]
        self._device_copied = self._copy_from_device(device_pairs) if device_pairs else None
        host_pairs = [(src, dst) for src, dst in pairs if src.device.type == "cpu"]
        self._host_copied = self._executor.submit(_copy_all, host_pairs)
        # The same single thread, so this runs after the host copies: the write may start.
        self._future = self._executor.submit(_when_copied, self._device_copied, staged)
        return self._future

    def fence(self) -> None:
        """Before anything changes the staged tensors in place (optimizer.step): the host copies
        are done, and the compute stream will not run ahead of the device copies."""
        if self._host_copied is not None:
            self._host_copied.result()
        if self._device_copied is not None:
            torch.cuda.current_stream().wait_event(self._device_copied)
            self._device_copied = None

    def synchronize_staging(self) -> None:
        if self._future is not None:
            self._future.result()

    def close(self, wait: bool = True) -> None:
        """Free the buffers once the copy in flight is done; wait=False leaves them to a write
        that may still read them (an abandoned save) and returns at once."""
        self._executor.shutdown(wait=wait)
        if wait:
            self._buffers.clear()
            self._wrappers.clear()

    def _copy_from_device(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        """Non-blocking copies into pinned buffers on a side stream; -> the event after them."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        self._side_stream.wait_stream(torch.cuda.current_stream())  # the last step's updates first
        with torch.cuda.stream(self._side_stream), torch.no_grad():
            for src, dst in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self._side_stream)  # the allocator keeps src until the copy ran
        done = torch.cuda.Event()
        done.record(self._side_stream)
        return done

    def _mirror(self, obj: Any, path: str, pairs: list) -> Any:
        if isinstance(obj, DTensor):  # stage the local shard; keep the global layout for DCP's planner
            local = self._buffer(path, obj.to_local(), pairs)
            cached = self._wrappers.get(path)
            if cached is not None and cached[0] is local and cached[1]._spec == obj._spec:
                return cached[1]
            wrapper = DTensor.from_local(
                local, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape, stride=obj.stride()
            )
            self._wrappers[path] = (local, wrapper)
            return wrapper
        if isinstance(obj, torch.Tensor):
            return self._buffer(path, obj, pairs)
        if isinstance(obj, dict):
            return {k: self._mirror(v, f"{path}/{k}", pairs) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._mirror(v, f"{path}/{i}", pairs) for i, v in enumerate(obj))
        return copy.deepcopy(obj)  # numbers, strings, None: the optimizer's hyperparameters

    def _buffer(self, path: str, src: torch.Tensor, pairs: list) -> torch.Tensor:
        if src.device.type not in ("cpu", "cuda"):
            raise ValueError(f"HostStager stages CPU and CUDA tensors; {path} is on {src.device}")
        pinned = src.device.type == "cuda"  # pinned: the device copies can run asynchronously
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype or buf.is_pinned() != pinned:
            # pages are touched by the copy, off the training thread
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pinned)
            self._buffers[path] = buf
        pairs.append((src, buf))
        return buf


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for src, dst in pairs:
            dst.copy_(src)


def _when_copied(device_copied, staged: dict) -> dict:
    if device_copied is not None:
        device_copied.synchronize()
    return staged
