"""Spawn N real gloo processes in a test and bring rank 0's result back."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from framework.distributed import free_port


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, out: str, device: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from framework.distributed import init_distributed

    init_distributed(device=device)  # cpu: gloo ranks, also where a GPU is visible
    result = fn(rank, world, *args)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo threads can abort the interpreter at exit (framework.distributed.shutdown)


def run_workers(fn: Callable, world: int, *args, timeout: float = 300, device: str = "cpu") -> object:
    """Run fn(rank, world, *args) on `world` processes; -> what rank 0 returned.
    fn must be a module-level function (spawn pickles it) and return tensors/plain data.
    device: cpu (gloo) or cuda (NCCL, one GPU per rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out, device)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
        codes = [p.exitcode for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
        assert codes == [0] * world, f"workers exited with {codes}"
        return torch.load(out, weights_only=True)
