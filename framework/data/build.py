"""Builds this rank's train loader and validation batches from the data config."""

from __future__ import annotations

from pathlib import Path

import torch

from framework.data.loader import BatchLoader, validation_batches
from framework.data.sampler import SequenceSampler
from framework.data.synthetic import synthetic_tokens
from framework.data.token_file import InMemoryTokens, TokenFile, TokenSource

SYNTHETIC_VAL_FRACTION = 0.1


def build_sources(cfg) -> tuple[TokenSource, TokenSource]:
    """(train, validation) token sources; synthetic ones are one stream split in two,
    so validation follows the same distribution as training."""
    d, vocab = cfg.data, cfg.model.vocab_size
    if d.source == "synthetic":
        n_val = max(int(d.synthetic_tokens * SYNTHETIC_VAL_FRACTION), 2 * (cfg.model.seq_len + 1))
        tokens = synthetic_tokens(d.synthetic_tokens + n_val, vocab, cfg.train.seed)
        return InMemoryTokens(tokens[: d.synthetic_tokens], vocab), InMemoryTokens(tokens[d.synthetic_tokens :], vocab)
    train, val = TokenFile(Path(d.path) / "train"), TokenFile(Path(d.path) / "val")
    for src, name in ((train, "train"), (val, "val")):
        if src.vocab_size > vocab:
            raise ValueError(
                f"data.path={d.path}: {name} tokens use a vocabulary of {src.vocab_size}, "
                f"larger than model.vocab_size={vocab}"
            )
    return train, val


def build_data(cfg, dp_rank: int, dp_size: int) -> tuple[BatchLoader, list[torch.Tensor]]:
    """This rank's train loader and its share of the fixed validation batches."""
    train, val = build_sources(cfg)
    sampler = SequenceSampler(
        num_tokens=len(train),
        seq_len=cfg.model.seq_len,
        global_batch_size=cfg.train.global_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.train.seed,
    )
    loader = BatchLoader(train, sampler, cfg.train.micro_batch_size)
    val_batches = validation_batches(
        val, cfg.model.seq_len, cfg.train.eval_batches, cfg.train.micro_batch_size, dp_rank, dp_size
    )
    return loader, val_batches
