"""Token files checked before launch: sidecar and size (empty, truncated) and every token id
below the vocabulary, so bad data stops in one line instead of in every rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from framework.data.token_file import TokenFile
from launcher.errors import ConfigError

ON_DISK = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # the sidecar's dtype names
SCAN_CHUNK_TOKENS = 1 << 26  # 128 MiB of uint16 per numpy max(): bounded memory, memory-bandwidth speed


def max_token_id(tokens: TokenFile) -> int:
    """The largest id in a token file: one numpy pass over the memmap, chunk by chunk."""
    ids = np.memmap(tokens.path, dtype=ON_DISK[tokens.dtype], mode="r", shape=(tokens.num_tokens,))
    high = 0
    for start in range(0, tokens.num_tokens, SCAN_CHUNK_TOKENS):
        high = max(high, int(ids[start : start + SCAN_CHUNK_TOKENS].max()))
    return high


def check_token_files(cfg: DictConfig) -> None:
    """train and val under data.path: readable, long enough for one sample, ids < vocab_size."""
    d, m = cfg.data, cfg.model
    need = m.seq_len + 1  # one sample: seq_len inputs plus the shifted target
    for split in ("train", "val"):
        try:
            tokens = TokenFile(Path(d.path) / split)
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.path={d.path}: {err}") from None
        if tokens.num_tokens < need:
            raise ConfigError(
                f"data.path={d.path}: {tokens.path} holds {tokens.num_tokens} tokens, too few for model.seq_len="
                f"{m.seq_len} (one sample needs {need}); allowed: a token file of at least {need} tokens"
            )
        limit = min(tokens.vocab_size, m.vocab_size)
        high = max_token_id(tokens)
        if high >= limit:
            raise ConfigError(
                f"data.path={d.path}: {tokens.path} holds token id {high}, outside the allowed [0, {limit}) "
                f"(its sidecar's vocab_size={tokens.vocab_size}, model.vocab_size={m.vocab_size}); "
                "re-tokenize the data or fix the sidecar"
            )
