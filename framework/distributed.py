"""Process-group setup for a rank started by torchrun: device and backend picked for it.

CUDA + NCCL where a GPU is visible, CPU + gloo otherwise; a single process without
torchrun's environment runs as a world of one.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 600) -> DistContext:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if "MASTER_ADDR" not in os.environ:  # a plain `python -m framework.train`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,
    )
    return DistContext(rank, world, local_rank, device)


def free_port() -> int:
    """A TCP port nothing listens on now, for a rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown(exit_code: int = 0) -> None:
    """Tear down and exit at once. Gloo's worker threads can abort the interpreter at
    shutdown ("terminate called without an active exception") when tensors are still
    referenced, so after a clean barrier and destroy we leave via os._exit."""
    if dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer died: nothing left to tear down politely
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
