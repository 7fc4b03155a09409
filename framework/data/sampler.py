"""Which training windows each data-parallel rank reads at each step, as plain resumable state.
The global order depends only on seed and samples consumed, so any dp layout sees the same data."""

from __future__ import annotations

from typing import Any

import torch


class SequenceSampler:
    """Walks a seeded per-epoch permutation of fixed chunks; rank r reads slice r of each step.

    A sample is a window of seq_len + 1 tokens (inputs plus shifted targets) starting at
    chunk * seq_len. Global sample g is chunk perm_{g // num_chunks}[g % num_chunks], where
    perm_e = randperm(num_chunks) seeded with seed + e; the state is just (seed, consumed).
    """

    def __init__(
        self,
        num_tokens: int,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}; allowed: an integer >= 1")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size}; allowed: an integer >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}; allowed: dp_size >= 1, 0 <= dp_rank < dp_size")
        if global_batch_size % dp_size != 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by dp_size={dp_size}; "
                "every rank must get the same number of sequences"
            )
        num_chunks = (num_tokens - 1) // seq_len
        if num_chunks < 1:
            raise ValueError(
                f"the data has {num_tokens} tokens, too few for seq_len={seq_len} (one sample needs {seq_len + 1})"
            )
        self._num_tokens = num_tokens
        self._seq_len = seq_len
        self._global_batch_size = global_batch_size
        self._dp_rank = dp_rank
        self._dp_size = dp_size
        self._seed = seed
        self._num_chunks = num_chunks
        self._consumed = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def num_chunks(self) -> int:
        return self._num_chunks

    @property
    def samples_per_rank(self) -> int:
        return self._global_batch_size // self._dp_size

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def _permutation(self, epoch: int) -> list[int]:
        """This epoch's chunk order, cached because a step nearly always stays in one epoch."""
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self._seed + epoch)
            self._perm = torch.randperm(self._num_chunks, generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm

    def _start_of(self, sample: int) -> int:
        epoch, index = divmod(sample, self._num_chunks)
        return self._permutation(epoch)[index] * self._seq_len

    def next_step_starts(self) -> list[int]:
        """Token offsets of this rank's contiguous share of the next global batch, then advance."""
        first = self._consumed + self._dp_rank * self.samples_per_rank
        starts = [self._start_of(g) for g in range(first, first + self.samples_per_rank)]
        self._consumed += self._global_batch_size
        return starts

    def state_dict(self) -> dict[str, Any]:
        """Layout-free state: the same dict resumes correctly under any dp_size."""
        return {
            "consumed_samples": self._consumed,
            "seed": self._seed,
            "seq_len": self._seq_len,
            "num_chunks": self._num_chunks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position and seed; refuse data whose chunking differs, as order would silently change."""
        if state["seq_len"] != self._seq_len or state["num_chunks"] != self._num_chunks:
            raise ValueError(
                f"sampler state has seq_len={state['seq_len']}, num_chunks={state['num_chunks']}, "
                f"but this run has seq_len={self._seq_len}, num_chunks={self._num_chunks}; "
                "resume needs the same data and seq_len"
            )
        consumed = state["consumed_samples"]
        if not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"consumed_samples={consumed!r}; allowed: an integer >= 0")
        self._consumed = consumed
        self._seed = int(state["seed"])
        self._perm_epoch = -1
