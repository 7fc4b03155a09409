"""DCP's FileSystemWriter with every file it writes checksummed on the writing thread.

The checksums (and sizes) of the shards and of `.metadata` are collected here and end up in
COMMITTED; hashing on DCP's writer threads keeps the cost inside the write (see bench_checkpoint).
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from checkpoint.checksum import HashingStream


class ChecksummingFileSystem(FileSystem):
    """DCP's local file system whose write streams hash what passes through them."""

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, tuple[int, str]] = {}  # final file name -> (size, checksum)
        self._lock = threading.Lock()  # DCP writes files from several threads

    @contextmanager
    def create_stream(self, path, mode: str) -> Generator:
        if "w" not in mode and "a" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = HashingStream(raw)
            yield stream
            stream.flush()
        name = Path(path).name.removesuffix(".tmp")  # DCP writes `.metadata.tmp`, then renames it
        with self._lock:
            self.written[name] = (stream.hasher.size, stream.hasher.hexdigest())


def checksumming_writer(path: Path, thread_count: int) -> tuple[dcp.FileSystemWriter, ChecksummingFileSystem]:
    """A FileSystemWriter (fsyncing its files) for `path`, and the file system that records what it wrote."""
    writer = dcp.FileSystemWriter(str(path), thread_count=thread_count, sync_files=True)
    fs = ChecksummingFileSystem()
    writer.fs = fs  # the one attribute every FileSystemWriter (torch 2.11-2.15) writes through
    return writer, fs
