"""Copies a CPU state dict into reused host buffers on a background thread, for async save.

DCP's DefaultStager copies with `UntypedStorage.copy_`, which holds the GIL for the whole
copy of each tensor: on CPU the training thread stalls until the copy ends, so staging in
the background blocked training almost as long as staging in the foreground. `Tensor.copy_`
releases the GIL, so here the training thread runs on while the copy proceeds. Buffers are
kept per state-dict entry and reused by every later save. (On GPU the manager keeps DCP's
stager: pinned buffers and non-blocking copies on a side stream have no such stall.)
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.tensor import DTensor


class CpuStager:
    """DCP's AsyncStager protocol: stage() returns a Future of the staged state dict."""

    should_synchronize_after_execute = False  # DCP need not wait for staging after starting the write

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-stage")
        self._buffers: dict[str, torch.Tensor] = {}
        self._wrappers: dict[str, tuple[torch.Tensor, DTensor]] = {}  # (buffer, DTensor over it), reused
        self._future: Future | None = None

    def stage(self, state_dict: dict) -> Future:
        """Build the staged dict over host buffers now (cheap), copy into them in the background."""
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        staged = self._mirror(state_dict, "", pairs)
        self._future = self._executor.submit(_copy_all, pairs, staged)
        return self._future

    def synchronize_staging(self) -> None:
        if self._future is not None:
            self._future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._buffers.clear()
        self._wrappers.clear()

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
        if src.device.type != "cpu":
            raise ValueError(f"CpuStager stages CPU tensors; {path} is on {src.device}")
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype)  # pages are touched by the copy, off-thread
            self._buffers[path] = buf
        pairs.append((src, buf))
        return buf


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]], staged: dict) -> dict:
    with torch.no_grad():
        for src, dst in pairs:
            dst.copy_(src)
    return staged
