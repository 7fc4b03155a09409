"""Process-group setup for a rank started by torchrun: device and backend picked for it.

train.device picks it: cuda (CUDA + NCCL), cpu (CPU + gloo, even where a GPU is visible),
or auto (CUDA where a GPU is visible, else CPU). A single process without torchrun's
environment runs as a world of one.
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


def pick_device(requested: str, local_rank: int) -> tuple[torch.device, str]:
    """-> (this rank's device, process-group backend) for train.device = auto | cpu | cuda."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device={requested}: allowed: auto, cpu, cuda")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), "gloo"
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda: this process sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda", local_rank % torch.cuda.device_count()), "nccl"


def init_distributed(timeout_s: int = 600, device: str = "auto") -> DistContext:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch_device, backend = pick_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if "MASTER_ADDR" not in os.environ:  # a plain `python -m framework.train`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        # NCCL: connect now, and later groups split from it connected too (parallel/mesh.py warm_up)
        device_id=torch_device if backend == "nccl" else None,
    )
    return DistContext(rank, world, local_rank, torch_device)


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
