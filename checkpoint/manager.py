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
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from checkpoint.commit import (
    CHECKPOINTS_DIR,
    COMMIT_MARKER,
    RUN_CONFIG,
    TRAINER_STATE,
    check_complete,
    file_sizes,
    fsync_dir,
    step_dir_name,
    step_dirs,
)
from checkpoint.staging import CpuStager


class NoCheckpointError(RuntimeError):
    """resume asked for a checkpoint and none is usable."""


@dataclass(frozen=True)
class Found:
    path: Path
    step: int
    trainer_state: dict[str, Any]


class CheckpointManager:
    """Save, retain and find checkpoints under RUN_DIR/checkpoints."""

    def __init__(
        self, run_dir: str | Path, keep: int, async_save: bool, rank: int, world_size: int, write_threads: int = 2
    ):
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.keep, self.async_save, self.write_threads = keep, async_save, write_threads
        self.rank, self.world_size = rank, world_size
        self._pending: Future | None = None  # an async save's write + commit, done in the background
        self._staging: Future | None = None  # done once the async save's host copy is complete
        # Async saves run collectives from background threads (DCP's write, then our commit):
        # their own group keeps them from interleaving with training's on the default group.
        self._async_group = dist.new_group(backend="gloo") if async_save else None
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-commit") if async_save else None
        # One stager for the whole run: it keeps its host buffers, so later saves copy into
        # them instead of allocating the whole state again. The copy runs on a background
        # thread, so save() returns at once and training overlaps the copy up to
        # wait_staged(), the fence before the weights change.
        self._stager = _make_stager() if async_save else None
        # DCP writes every tensor with torch.save, which computes a CRC32 of the bytes that
        # torch.load never checks (a flipped byte loads silently): ~10% of a sync save here.
        # Completeness is checked through COMMITTED's file sizes instead. Process-wide: this
        # manager lives in the training process, whose only other torch.save is the RNG file.
        torch.serialization.set_crc32_options(False)
        # The config this segment was launched with, read now: a later launch may rewrite the
        # file while this one runs. Each checkpoint keeps a copy (None: run without the launcher).
        run_config = Path(run_dir) / RUN_CONFIG
        self._run_config = run_config.read_text() if rank == 0 and run_config.is_file() else None
        if rank == 0:  # leftovers of a crash mid-save: never complete, never resumed from
            for tmp in self.root.glob("step-*.tmp") if self.root.is_dir() else []:
                shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()

    # ---- finding -------------------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        return step_dirs(self.root)

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
        """Collective. Sync: returns when committed. Async: returns once the host copy has
        started; call wait_staged() before the weights change; the write and the commit
        finish in the background (wait() or close() join them)."""
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)  # every rank: no barrier needed before writing
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        torch.save(_rng_state(), tmp / f"rng-rank{self.rank:05d}.pt")
        # Frozen now: the trainer's dicts (sampler, scheduler) move on while an async save runs.
        trainer_json = json.dumps({**trainer_state, "world_size": self.world_size}, indent=1)
        writer = dcp.FileSystemWriter(str(tmp), thread_count=self.write_threads, sync_files=True)
        if self.async_save:
            if torch.cuda.is_available():  # the stager copies on its own stream: the last
                torch.cuda.current_stream().synchronize()  # optimizer step must be done first
            response = dcp.async_save(
                state, storage_writer=writer, process_group=self._async_group, async_stager=self._stager
            )
            self._staging = response.staging_completion
            self._pending = self._committer.submit(
                self._commit_when_written, response.upload_completion, tmp, final, trainer_json
            )
        else:
            dcp.save(state, storage_writer=writer)
            self._commit(tmp, final, trainer_json)

    def wait_staged(self) -> None:
        """Block until an async save has copied every tensor to host memory (not collective).
        Call it before anything changes weights, optimizer state or buffers in place."""
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def wait(self) -> None:
        """Until an async save in flight is written and committed; raises what it raised."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self.wait_staged()
        pending.result()

    def close(self) -> None:
        """Commit what is in flight and free the staging buffers and threads."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._committer.shutdown()
            self._stager = None

    def _commit_when_written(self, upload: Future, tmp: Path, final: Path, trainer_json: str) -> None:
        """The committer thread: after this rank's DCP write, commit on the async group."""
        upload.result()
        self._commit(tmp, final, trainer_json, self._async_group)

    def _commit(self, tmp: Path, final: Path, trainer_json: str, group: dist.ProcessGroup | None = None) -> None:
        dist.barrier(group=group)  # every rank's shards and RNG file are on disk (DCP fsynced its shards)
        if self.rank == 0:
            (tmp / TRAINER_STATE).write_text(trainer_json)
            if self._run_config is not None:
                (tmp / RUN_CONFIG).write_text(self._run_config)
            for f in tmp.iterdir():  # the RNG files, the trainer state, the config, DCP's metadata
                if not f.name.endswith(".distcp"):
                    with f.open("rb") as fh:
                        os.fsync(fh.fileno())
            (tmp / COMMIT_MARKER).write_text(json.dumps({"files": file_sizes(tmp)}))
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. final save after a signal)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(final.parent)
            self._retain()
        dist.barrier(group=group)

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


def _make_stager():
    if torch.cuda.is_available():  # pinned buffers, non-blocking copies on a side stream
        return DefaultStager(StagingOptions(True, False, True, True))
    return CpuStager()  # DCP's stager stalls the training thread on CPU (see checkpoint/staging.py)


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
