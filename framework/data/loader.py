"""Turns sampler offsets into int64 token tensors: per-step micro-batches and a fixed validation set.
Reading stays here so the sampler remains pure state and the train loop sees only tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from framework.data.sampler import SequenceSampler
from framework.data.token_file import TokenSource


class BatchLoader:
    """This rank's micro-batches, each [micro_batch_size, seq_len + 1] (inputs + shifted targets)."""

    def __init__(self, source: TokenSource, sampler: SequenceSampler, micro_batch_size: int) -> None:
        if source.num_tokens != sampler.num_tokens:
            raise ValueError(
                f"sampler was built for {sampler.num_tokens} tokens but the source has "
                f"{source.num_tokens}; build both from the same data"
            )
        per_rank = sampler.samples_per_rank
        if micro_batch_size < 1 or per_rank % micro_batch_size != 0:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} must be >= 1 and divide the per-rank batch "
                f"{per_rank} (global_batch_size / dp_size)"
            )
        self.source = source
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size

    def next_step(self) -> list[torch.Tensor]:
        """The micro-batches for one optimizer step, in sampler order, so accumulation is layout-free."""
        length = self.sampler.seq_len + 1
        starts = self.sampler.next_step_starts()
        windows = np.stack([self.source.window(s, length) for s in starts])
        return list(torch.from_numpy(windows).split(self.micro_batch_size))


@dataclass(frozen=True)
class ValidationBatch:
    """One evaluation forward: `tokens_BS1` rows [B, seq_len + 1], of which the first
    `valid_rows` are real windows and the rest padding (scored with weight zero)."""

    tokens_BS1: torch.Tensor
    valid_rows: int


def validation_batches(
    source: TokenSource,
    seq_len: int,
    num_batches: int,
    batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> list[ValidationBatch]:
    """This rank's share of num_batches * batch_size windows evenly spaced over the source.

    Fixed (not random) so every evaluation scores the same text. Ranks take contiguous,
    near-equal shares in global order, so summing loss and window counts over ranks gives
    exactly the single-process mean. Every rank runs the SAME number of forwards (the
    largest share's), padding short ones with weight-zero rows: FSDP and expert-parallel
    collectives inside the forward must line up on all ranks.
    """
    if seq_len < 1 or num_batches < 1 or batch_size < 1:
        raise ValueError(
            f"seq_len={seq_len}, num_batches={num_batches}, batch_size={batch_size}; allowed: each an integer >= 1"
        )
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}; allowed: 0 <= dp_rank < dp_size")
    last_start = source.num_tokens - (seq_len + 1)
    if last_start < 0:
        raise ValueError(
            f"the validation data has {source.num_tokens} tokens, too few for seq_len={seq_len} "
            f"(one window needs {seq_len + 1})"
        )
    total = num_batches * batch_size
    starts = [i * last_start // max(total - 1, 1) for i in range(total)]
    mine = starts[dp_rank * total // dp_size : (dp_rank + 1) * total // dp_size]
    largest_share = max((r + 1) * total // dp_size - r * total // dp_size for r in range(dp_size))
    forwards = -(-largest_share // batch_size)
    pad_start = mine[0] if mine else starts[0]
    batches = []
    for i in range(forwards):
        real = mine[i * batch_size : (i + 1) * batch_size]
        rows = real + [pad_start] * (batch_size - len(real))
        windows = np.stack([source.window(s, seq_len + 1) for s in rows])
        batches.append(ValidationBatch(torch.from_numpy(windows), len(real)))
    return batches
