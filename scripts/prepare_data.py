"""Builds a byte-level train/val token file from this interpreter's standard-library .py sources.
Real text with no download, deterministic for a given Python, ready in seconds for smoke runs."""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from framework.data.token_file import write_token_file  # noqa: E402

VOCAB_SIZE = 256  # one token per byte
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_sources(root: str | Path) -> list[Path]:
    """Every .py under root in sorted walk order (tests and third-party packages skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return found


def collect_bytes(files: list[Path], max_bytes: int) -> tuple[bytes, int]:
    """The first max_bytes of the files' concatenation, and how many files contributed."""
    parts, size = [], 0
    for path in files:
        if size >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - size]
        parts.append(data)
        size += len(data)
    return b"".join(parts), len(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/stdlib", help="folder for train.* and val.*")
    parser.add_argument("--max-bytes", type=int, default=8_000_000, help="bytes (= tokens) in all")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="tail share held out")
    args = parser.parse_args(argv)
    if args.max_bytes < 2:
        parser.error(f"--max-bytes={args.max_bytes}; allowed: an integer >= 2")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction={args.val_fraction}; allowed: strictly between 0 and 1")

    root = sysconfig.get_paths()["stdlib"]
    data, num_files = collect_bytes(stdlib_sources(root), args.max_bytes)
    tokens = np.frombuffer(data, dtype=np.uint8)
    num_val = min(max(1, round(len(tokens) * args.val_fraction)), len(tokens) - 1)
    split = len(tokens) - num_val
    out = Path(args.out)
    write_token_file(out / "train", tokens[:split], VOCAB_SIZE)
    write_token_file(out / "val", tokens[split:], VOCAB_SIZE)
    print(f"{num_files} files from {root}: {split} train tokens, {num_val} val tokens -> {out}/")


if __name__ == "__main__":
    main()
