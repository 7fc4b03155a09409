"""The parallel layout as plain numbers: world = pp x dp_replicate x dp_shard, ep within dp.

Pure Python (no torch) so the launcher can check a layout before any process starts and
every rank resolves the same sizes from the same config.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.pipeline.schedules import PIPELINE_SCHEDULES  # noqa: F401  (the launcher checks pp_schedule against it)


@dataclass(frozen=True)
class Layout:
    world_size: int
    pp: int
    dp_replicate: int
    dp_shard: int
    ep: int

    @property
    def dp(self) -> int:
        """Ranks that see different data: everything but the pipeline dimension."""
        return self.dp_replicate * self.dp_shard

    @property
    def edp_shard(self) -> int:
        """Ranks holding the same experts that shard them: what is left of dp_shard after
        ep takes its part (1 when ep spans replicas too)."""
        return self.dp_shard // self.ep if self.dp_shard % self.ep == 0 else 1

    @property
    def edp_replicate(self) -> int:
        """Copies of each expert shard: the rest of the data-parallel ranks."""
        return self.dp // (self.ep * self.edp_shard)


def parse_dp_replicate(value: object) -> int | None:
    """`parallel.dp_replicate` as given (an int, "auto", or digits as a string such as a quoted
    YAML "2") -> the int, or None for auto. The launcher's check and every rank read it here."""
    if value == "auto":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"parallel.dp_replicate={value}: allowed: an int >= 1 or 'auto'")
    return value


def resolve_layout(world_size: int, pp: int, dp_replicate: int | str, dp_shard: int, ep: int) -> Layout:
    """Fill in `dp_replicate="auto"` / `dp_shard=-1` and check that the sizes multiply up."""
    if world_size < 1:
        raise ValueError(f"world size {world_size}: must be >= 1")
    if pp < 1:
        raise ValueError(f"parallel.pp={pp}: must be >= 1")
    if ep < 1:
        raise ValueError(f"parallel.ep={ep}: must be >= 1")
    if world_size % pp:
        raise ValueError(f"parallel.pp={pp}: must divide the world size {world_size}")
    dp = world_size // pp
    dp_replicate = parse_dp_replicate(dp_replicate)
    auto_replicate = dp_replicate is None
    if dp_shard != -1 and dp_shard < 1:
        raise ValueError(f"parallel.dp_shard={dp_shard}: allowed: an int >= 1 or -1 (all that is left)")
    if dp_shard == -1:
        replicate = 1 if auto_replicate else dp_replicate
        if dp % replicate:
            raise ValueError(
                f"parallel.dp_replicate={replicate}: must divide the {dp} data-parallel ranks "
                f"(world size {world_size} / pp {pp})"
            )
        shard = dp // replicate
    else:
        shard = dp_shard
        if dp % shard:
            raise ValueError(
                f"parallel.dp_shard={shard}: must divide the {dp} data-parallel ranks "
                f"(world size {world_size} / pp {pp})"
            )
        replicate = dp // shard if auto_replicate else dp_replicate
    if pp * replicate * shard != world_size:
        raise ValueError(
            f"parallel sizes pp={pp} x dp_replicate={replicate} x dp_shard={shard} = "
            f"{pp * replicate * shard}, but the world size is {world_size}"
        )
    if dp % ep:
        raise ValueError(f"parallel.ep={ep}: must divide the {dp} data-parallel ranks (dp_replicate x dp_shard)")
    if shard % ep and ep % shard:
        raise ValueError(
            f"parallel.ep={ep}: must divide parallel.dp_shard={shard} or be a multiple of it, "
            "so each expert-parallel group is whole shard groups or lies within one"
        )
    return Layout(world_size=world_size, pp=pp, dp_replicate=replicate, dp_shard=shard, ep=ep)
