"""Distributed checkpoints: every rank writes its shards with PyTorch DCP, committed atomically.

A checkpoint is written to `step-XXXXXXXX.tmp` and renamed to `step-XXXXXXXX` only after
every rank finished and rank 0 wrote `COMMITTED` (file sizes inside), so a crash mid-save
never leaves a directory that looks complete. Loading checks the marker and every file's
size, and falls back to the previous checkpoint with a one-line warning.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

CHECKPOINTS_DIR = "checkpoints"
COMMIT_MARKER = "COMMITTED"
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


class NoCheckpointError(RuntimeError):
    """resume asked for a checkpoint and none is usable."""


@dataclass(frozen=True)
class Found:
    path: Path
    step: int
    trainer_state: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _file_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMMIT_MARKER}


def check_complete(path: Path) -> str | None:
    """None if the checkpoint is whole, else why not (one phrase)."""
    marker = path / COMMIT_MARKER
    if not marker.is_file():
        return "no COMMITTED marker"
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable COMMITTED marker"
    actual = _file_sizes(path)
    for name, size in expected.items():
        if name not in actual:
            return f"missing {name}"
        if actual[name] != size:
            return f"{name} is {actual[name]} bytes, expected {size} (truncated?)"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Save, retain and find checkpoints under RUN_DIR/checkpoints."""

    def __init__(self, run_dir: str | Path, keep: int, async_save: bool, rank: int, world_size: int):
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.keep, self.async_save = keep, async_save
        self.rank, self.world_size = rank, world_size
        self._pending: tuple[Any, Path, Path, dict] | None = None  # (future, tmp, final, trainer_state)
        # Async saves run collectives from a background thread: give them their own group so
        # they never interleave with training's collectives on the default group.
        self._async_group = dist.new_group(backend="gloo") if async_save else None
        # One stager for the whole run: it keeps its host-memory buffers, so later saves only
        # copy into them instead of allocating ~the whole state again (4x less blocking here).
        on_gpu = torch.cuda.is_available()
        self._stager = DefaultStager(StagingOptions(on_gpu, False, False, on_gpu)) if async_save else None

    # ---- finding -------------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def find(self, resume: str) -> Found | None:
        """resume=auto: the newest whole checkpoint (None if there is none); never: None;
        a path: that checkpoint, which must be whole."""
        if resume == "never":
            return None
        candidates = [Path(resume)] if resume != "auto" else list(reversed(self.committed()))
        for path in candidates:
            problem = check_complete(path) if path.is_dir() else "no such directory"
            if problem is None:
                state = json.loads((path / TRAINER_STATE).read_text())
                return Found(path, int(state["step"]), state)
            self._warn(f"skipping checkpoint {path}: {problem}")
        if resume != "auto":
            raise NoCheckpointError(f"resume={resume}: not a usable checkpoint")
        if candidates:
            raise NoCheckpointError(f"no usable checkpoint in {self.root}: every one is incomplete or corrupt")
        return None

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            print(f"moe-launch: warning: {message}", file=sys.stderr, flush=True)

    # ---- saving --------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> None:
        """Collective. Sync: returns when committed. Async: returns once tensors are staged in
        host memory; the write finishes in the background and commits at the next save/wait."""
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash mid-save
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        torch.save(_rng_state(), tmp / f"rng-rank{self.rank:05d}.pt")
        if self.async_save:
            future = dcp.async_save(
                state, checkpoint_id=str(tmp), process_group=self._async_group, async_stager=self._stager
            )
            self._pending = (future, tmp, final, trainer_state)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp, final, trainer_state)

    def wait(self) -> None:
        """Finish and commit an async save still in flight (collective)."""
        if self._pending is None:
            return
        future, tmp, final, trainer_state = self._pending
        self._pending = None
        future.result()
        self._commit(tmp, final, trainer_state)

    def _commit(self, tmp: Path, final: Path, trainer_state: dict) -> None:
        dist.barrier()  # every rank's shards and RNG file are on disk
        if self.rank == 0:
            state = {**trainer_state, "world_size": self.world_size}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            for f in tmp.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
            (tmp / COMMIT_MARKER).write_text(json.dumps({"files": _file_sizes(tmp)}))
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. final save after a signal)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            self._retain()
        dist.barrier()

    def _retain(self) -> None:
        for old in self.committed()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- loading -------------------------------------------------------------------------
    def load(self, found: Found, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Collective. DCP reshards every tensor onto the current layout."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(found.path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = found.path / f"rng-rank{self.rank:05d}.pt"
        if found.trainer_state.get("world_size") == self.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
