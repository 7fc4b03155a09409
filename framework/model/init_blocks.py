"""Random init defined block by block, so any shard can be drawn without the whole tensor.

A weight of global shape [R, ...] is cut into blocks of whole rows (about 2**20 values
each); block b is drawn from its own generator seeded by (seed, parameter name, b). The
values depend only on the seed, the name and the global shape: the same on one process as
on any expert-parallel / FSDP / HSDP layout, and a rank touching rows [r0, r1) draws only
the blocks those rows fall in.
"""

from __future__ import annotations

import hashlib
import math

import torch

BLOCK_VALUES = 1 << 20


def block_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit seed from (seed, name, block); stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def fill_normal_rows(
    local: torch.Tensor, first_row: int, global_shape: tuple[int, ...], std: float, seed: int, name: str
) -> None:
    """Write N(0, std) values into `local`, which holds global rows [first_row, first_row + len)."""
    rows = local.shape[0]
    if rows == 0:
        return
    row_values = math.prod(global_shape[1:])
    rows_per_block = max(1, BLOCK_VALUES // row_values)
    last_row = first_row + rows
    for block in range(first_row // rows_per_block, -(-last_row // rows_per_block)):
        start = block * rows_per_block
        stop = min(start + rows_per_block, global_shape[0])
        gen = torch.Generator().manual_seed(block_seed(seed, name, block))
        values = torch.empty((stop - start, *global_shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=gen)
        lo, hi = max(first_row, start), min(last_row, stop)
        local[lo - first_row : hi - first_row].copy_(values[lo - start : hi - start])
