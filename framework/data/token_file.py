"""The token file format users bring (<prefix>.bin raw tokens + <prefix>.json sidecar) and readers.
The sidecar states dtype and length, so a truncated .bin fails loudly instead of feeding garbage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np

FORMAT = "moe-launch-tokens-v1"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class TokenSource(Protocol):
    """What the sampler and loader need from tokens, on disk or in memory."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def __len__(self) -> int: ...

    def window(self, start: int, length: int) -> np.ndarray: ...


def _dtype_name(vocab_size: int) -> str:
    """The smallest on-disk dtype that holds every id, to halve disk and page-cache use when possible."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size={vocab_size} is out of range; allowed 1..{2**32}")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _check_tokens(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Reject arrays that would silently wrap or index past the embedding table."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    if tokens.size == 0:
        raise ValueError("tokens is empty; need at least one token")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"token ids span [{low}, {high}], outside the allowed [0, {vocab_size}) for vocab_size={vocab_size}"
        )
    return tokens


def _check_window(start: int, length: int, num_tokens: int) -> None:
    if start < 0 or length < 0 or start + length > num_tokens:
        raise IndexError(f"window start={start} length={length} is outside the {num_tokens} available tokens")


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write to a temp name then rename, so readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_token_file(prefix: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write <prefix>.bin then <prefix>.json; the sidecar goes last so a crash never leaves a valid-looking pair."""
    dtype_name = _dtype_name(vocab_size)
    tokens = _check_tokens(tokens, vocab_size)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    meta_path, bin_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".bin")
    meta_path.unlink(missing_ok=True)  # an old sidecar must not vouch for a new, half-written .bin
    _replace_atomically(bin_path, tokens.astype(_DTYPES[dtype_name]).tobytes())
    meta = {"format": FORMAT, "dtype": dtype_name, "num_tokens": int(tokens.size), "vocab_size": int(vocab_size)}
    _replace_atomically(meta_path, (json.dumps(meta, indent=2) + "\n").encode())


class _TokenArray:
    """The read side both sources share: `_tokens` (any 1-D integer array) and `_vocab_size`."""

    _tokens: np.ndarray
    _vocab_size: int

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.shape[0])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self.num_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """An int64 copy, so callers never hold a view into the memmap or wrap uint16 arithmetic."""
        _check_window(start, length, self.num_tokens)
        return np.array(self._tokens[start : start + length], dtype=np.int64)


class TokenFile(_TokenArray):
    """A token file opened read-only through np.memmap, so every rank shares the OS page cache."""

    def __init__(self, prefix: str | Path) -> None:
        prefix = Path(prefix)
        meta_path, bin_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".bin")
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"token file sidecar {meta_path} not found; create it with write_token_file or scripts/prepare_data.py"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"token file sidecar {meta_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{meta_path} has format {found!r}; allowed: {FORMAT!r}")
        dtype_name, num_tokens, vocab_size = meta.get("dtype"), meta.get("num_tokens"), meta.get("vocab_size")
        if dtype_name not in _DTYPES:
            raise ValueError(f"{meta_path} has dtype {dtype_name!r}; allowed: {sorted(_DTYPES)}")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"{meta_path} has num_tokens {num_tokens!r}; allowed: an integer >= 1")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"{meta_path} has vocab_size {vocab_size!r}; allowed: an integer >= 1")
        if not bin_path.is_file():
            raise FileNotFoundError(f"token data {bin_path} not found (its sidecar {meta_path} exists)")
        dtype = _DTYPES[dtype_name]
        expected, actual = num_tokens * dtype.itemsize, bin_path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"{bin_path} is {actual} bytes but {meta_path} promises {num_tokens} {dtype_name} tokens "
                f"= {expected} bytes; the file is truncated or does not belong to this sidecar"
            )
        self._tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))
        self._vocab_size = vocab_size
        self._dtype_name = dtype_name
        self.path = bin_path

    @property
    def dtype(self) -> str:
        return self._dtype_name


class InMemoryTokens(_TokenArray):
    """The TokenSource for tokens generated on the fly (synthetic data, tests)."""

    def __init__(self, tokens: np.ndarray, vocab_size: int) -> None:
        self._tokens = _check_tokens(tokens, vocab_size)
        self._vocab_size = vocab_size
