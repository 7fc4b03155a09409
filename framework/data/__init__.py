"""Training data: token files on disk, synthetic tokens, per-rank sampling and batching.
Kept apart from the model so data order depends only on seed and step, never on layout."""
