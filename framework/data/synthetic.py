"""Synthetic token streams: a seeded sparse Markov chain, identical on every machine.
Learnable on purpose, so a smoke run's falling loss proves the model trains without any download."""

from __future__ import annotations

import numpy as np

# Each token has this many likely successors, with these probabilities; _NOISE of the time a
# uniformly random token comes instead. Bigram entropy is then ~1.7 nats, far below log(vocab),
# so even a tiny model's loss drops visibly within tens of steps.
_SUCCESSOR_PROBS = np.array([0.5, 0.25, 0.15, 0.1])
_NOISE = 0.1
# The stream is built as independent segments ("documents") stepped in lockstep, so generation
# costs _SEGMENT_LEN vectorised numpy steps instead of one Python step per token.
_SEGMENT_LEN = 1024


def synthetic_tokens(num_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    """A deterministic int64 token stream with strong next-token structure.

    Only PCG64 integers/uniforms are drawn (never rng.choice), whose streams numpy keeps stable,
    so the same arguments give the same array on any machine.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens}; allowed: an integer >= 1")
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size}; allowed: an integer >= 2")
    rng = np.random.default_rng(seed)
    k = len(_SUCCESSOR_PROBS)
    successors = rng.integers(0, vocab_size, size=(vocab_size, k))
    num_segments = -(-num_tokens // _SEGMENT_LEN)
    shape = (num_segments, _SEGMENT_LEN)
    choice = np.searchsorted(np.cumsum(_SUCCESSOR_PROBS), rng.random(shape), side="right")
    choice = np.minimum(choice, k - 1)  # guards a cumsum that rounds just below 1.0
    noisy = rng.random(shape) < _NOISE
    noise_tokens = rng.integers(0, vocab_size, size=shape)

    out = np.empty(shape, dtype=np.int64)
    out[:, 0] = noise_tokens[:, 0]  # every segment starts at a random token
    for t in range(1, _SEGMENT_LEN):
        follow = successors[out[:, t - 1], choice[:, t]]
        out[:, t] = np.where(noisy[:, t], noise_tokens[:, t], follow)
    return out.reshape(-1)[:num_tokens]
