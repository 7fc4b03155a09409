"""Distributed checkpoints: every rank writes its shards with PyTorch DCP, committed atomically.

A checkpoint is written to `step-XXXXXXXX.tmp` and renamed to `step-XXXXXXXX` only after
every rank finished and rank 0 wrote `COMMITTED` (each file's size and content checksum,
hashed while writing), so a crash mid-save never leaves a directory that looks complete.
Resume verifies the marker, the sizes and the checksums, and falls back to the previous
checkpoint with a one-line warning; retention counts only verified checkpoints.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from checkpoint.checksum import HashingStream, checksum_bytes
from checkpoint.commit import (
    CHECKPOINTS_DIR,
    COMMIT_MARKER,
    RUN_CONFIG,
    TRAINER_STATE,
    check_checkpoint,
    checksummed_files,
    file_sizes,
    fsync_dir,
    marker_text,
    step_dir_name,
    step_dirs,
    step_of,
    verify_files,
)
from checkpoint.staging import HostStager
from checkpoint.state import PerRankState, ShardedState, Stateful
from checkpoint.writer import checksumming_writer

# Feature check (torch 2.11-2.15): async save hands staging to our own stager.
ASYNC_STAGER_SUPPORTED = "async_stager" in inspect.signature(dcp.async_save).parameters


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, saved or committed; the message is one line."""


class NoCheckpointError(CheckpointError):
    """resume asked for a checkpoint and none is usable."""


class CommitError(CheckpointError):
    """A save failed on some rank; every rank raises this, none of them committed."""


@dataclass(frozen=True)
class Found:
    path: Path
    step: int
    trainer_state: dict[str, Any]  # trainer_state.json: the JSON states, the step, the world size


def per_rank_file(name: str, rank: int) -> str:
    return f"{name}-rank{rank:05d}.pt"


class CheckpointManager:
    """Save, retain and find checkpoints of the registered `states` under RUN_DIR/checkpoints.

    `states` is the one dict of everything a resume needs ({name: Stateful}); see
    checkpoint/state.py for where each kind is stored. Adding state is one entry there."""

    def __init__(
        self,
        run_dir: str | Path,
        states: dict[str, Stateful],
        keep: int,
        async_save: bool,
        rank: int,
        world_size: int,
        write_threads: int = 2,
    ):
        if async_save and not ASYNC_STAGER_SUPPORTED:
            raise CheckpointError(
                f"checkpoint.async=true needs dcp.async_save(async_stager=...); torch {torch.__version__}"
            )
        self.root = Path(run_dir) / CHECKPOINTS_DIR
        self.states = states
        self.keep, self.async_save, self.write_threads = keep, async_save, write_threads
        self.rank, self.world_size = rank, world_size
        self.resume_note = ""  # what a resume could not restore exactly, for the one-line resume message
        self._pending: Future | None = None  # an async save's write + commit, done in the background
        self._closed = False
        self._verified: set[str] = set()  # checkpoints (resolved paths) this process wrote or checked
        self._broken: set[str] = set()
        # Async saves run collectives from background threads (DCP's write, then our commit):
        # their own group keeps them from interleaving with training's on the default group.
        self._async_group = dist.new_group(backend="gloo") if async_save else None
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-commit") if async_save else None
        # One stager for the whole run: it keeps its host buffers, so later saves copy into
        # them instead of allocating the whole state again. The copy runs in the background,
        # so save() returns at once and training overlaps the copy up to wait_staged(), the
        # fence before the weights change.
        self._stager = HostStager() if async_save else None
        # DCP writes every tensor with torch.save, whose own CRC32 torch.load never checks:
        # COMMITTED's checksums cover every file instead. Process-wide: this manager lives in
        # the training process, whose only other torch.save is the RNG file.
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
        """Directories named like committed checkpoints, oldest first (not verified)."""
        return step_dirs(self.root)

    def find(self, resume: str) -> Found | None:
        """Collective. resume=auto: the newest verified checkpoint (None if there is none);
        never: None; a path: that checkpoint, which must verify."""
        if resume == "never":
            return None
        candidates = [Path(resume)] if resume != "auto" else list(reversed(self.committed()))
        for path in candidates:
            problem = self._verify(path)
            if problem is None:
                try:
                    state = json.loads((path / TRAINER_STATE).read_text())
                    return Found(path, int(state["step"]), state)
                except (ValueError, KeyError, TypeError, OSError) as err:
                    problem = f"unreadable {TRAINER_STATE} ({type(err).__name__}: {err})"
            self._warn(f"skipping checkpoint {path}: {problem}")
        if resume != "auto":
            raise NoCheckpointError(f"resume={resume}: not a usable checkpoint")
        if candidates:
            raise NoCheckpointError(f"no usable checkpoint in {self.root}: every one is incomplete or corrupt")
        return None

    def _verify(self, path: Path) -> str | None:
        """Collective: sizes on every rank, then each rank re-hashes its share of the files."""
        problem = check_checkpoint(path, verify=False)
        if problem is None and not (path / TRAINER_STATE).is_file():
            problem = f"missing {TRAINER_STATE}"
        names = checksummed_files(path) if problem is None else []
        mine = verify_files(path, names[self.rank :: self.world_size]) if names else None
        problems = [None] * self.world_size
        dist.all_gather_object(problems, problem or mine)
        found = next((p for p in problems if p), None)
        (self._broken if found else self._verified).add(_key(path))
        return found

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            print(f"moe-launch: warning: {message}", file=sys.stderr, flush=True)

    # ---- saving --------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Collective. Sync: returns when committed. Async: returns once the host copy has
        started; call wait_staged() before the weights change; the write and the commit
        finish in the background (wait() or close() join them). Raises CommitError on every
        rank if any rank failed (nothing is committed then)."""
        if self._closed:
            raise CheckpointError("save() after close()")
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)  # every rank: no barrier needed before writing
        local_files: dict[str, tuple[int, str]] = {}
        local_error = None
        try:  # this rank's own files; a failure is reported at the commit, which every rank reaches
            for name, state in self.states.items():
                if isinstance(state, PerRankState):
                    local_files[per_rank_file(name, self.rank)] = _save_torch(state.state_dict(), tmp, name, self.rank)
        except Exception as err:  # noqa: BLE001 - any failure must reach every rank, not hang them
            local_error = f"rank {self.rank}: {_one_line(err)}"
        # Frozen now: the JSON states (sampler, scheduler, counters) move on while an async save runs.
        json_states = {name: s.state_dict() for name, s in self.states.items() if _is_json_state(s)}
        trainer_json = json.dumps({"step": step, "world_size": self.world_size, **json_states}, indent=1)
        sharded = {name: s.state_dict() for name, s in self.states.items() if isinstance(s, ShardedState)}
        writer, fs = checksumming_writer(tmp, self.write_threads)
        if self.async_save:
            response = dcp.async_save(
                sharded, storage_writer=writer, process_group=self._async_group, async_stager=self._stager
            )
            self._pending = self._committer.submit(
                self._commit_when_written, response.upload_completion, tmp, final, trainer_json, local_files, fs,
                local_error,
            )  # fmt: skip
        else:
            try:
                dcp.save(sharded, storage_writer=writer)
            except Exception as err:  # DCP raises on every rank when any rank's write failed
                raise CommitError(f"checkpoint {final.name} was not written: {_one_line(err)}") from err
            self._commit(tmp, final, trainer_json, {**local_files, **fs.written}, local_error)

    def wait_staged(self) -> None:
        """The fence: call it before anything changes weights, optimizer state or buffers in
        place. CPU: blocks until the host copy is done; CUDA: also orders the compute stream
        after the device copies. Not collective."""
        if self._stager is not None:
            self._stager.fence()

    def wait(self) -> None:
        """Until an async save in flight is written and committed; raises what it raised."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self.wait_staged()
        pending.result()

    def close(self, raise_errors: bool = True, abandon: bool = False) -> None:
        """Finish the save in flight (commit it, or on failure commit nothing), free the staging
        buffers and threads. Safe to call more than once and on any exit path; a failure of the
        save in flight is raised once (raise_errors=False: a one-line warning instead).
        abandon=True does not wait: for an exit where the other ranks may not reach the commit;
        the uncommitted `.tmp` directory is removed at the next start."""
        if self._closed:
            return
        self._closed = True
        if abandon:
            if self._pending is not None and not self._pending.done():
                self._warn("abandoning the checkpoint in flight: it is not committed")
            self._pending = None
            if self._stager is not None:
                self._committer.shutdown(wait=False, cancel_futures=True)
                self._stager.close(wait=False)
                self._stager = None
            return
        try:
            self.wait()
        except Exception as err:
            if raise_errors:
                raise
            self._warn(f"the checkpoint in flight was not committed: {_one_line(err)}")
        finally:
            if self._stager is not None:
                self._stager.close()
                self._committer.shutdown(wait=True)
                self._stager = None

    def _commit_when_written(self, upload: Future, tmp: Path, final: Path, trainer_json: str, local_files, fs, error):
        """The committer thread: after this rank's DCP write, commit on the async group."""
        try:
            upload.result()
        except Exception as err:  # noqa: BLE001 - reported at the commit, which every rank reaches
            error = error or f"rank {self.rank}: {_one_line(err)}"
        self._commit(tmp, final, trainer_json, {**local_files, **fs.written}, error, self._async_group)

    def _commit(self, tmp: Path, final: Path, trainer_json: str, files, error: str | None, group=None) -> None:
        """Collective: rank 0 gathers every rank's file checksums, writes its own small files and
        COMMITTED, renames; the outcome is broadcast, so a failure anywhere (rank 0's included)
        reaches every rank at once as a CommitError instead of a hang at a barrier."""
        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((files, error), gathered, dst=dist.get_global_rank(group, 0) if group else 0, group=group)
        outcome = [None]
        if self.rank == 0:
            try:
                errors = [e for _, e in gathered if e]
                if errors:
                    raise CommitError(errors[0])
                merged = {name: entry for rank_files, _ in gathered for name, entry in rank_files.items()}
                self._write_commit(tmp, final, trainer_json, merged)
            except Exception as err:  # noqa: BLE001 - broadcast, then raised on every rank
                outcome[0] = _one_line(err)
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        if outcome[0] is not None:
            raise CommitError(f"checkpoint {final.name} was not committed: {outcome[0]}")

    def _write_commit(self, tmp: Path, final: Path, trainer_json: str, files: dict[str, tuple[int, str]]) -> None:
        """Rank 0: the trainer state and config, every file fsynced, COMMITTED, the rename."""
        small = {TRAINER_STATE: trainer_json.encode()}
        if self._run_config is not None:
            small[RUN_CONFIG] = self._run_config.encode()
        for name, data in small.items():
            (tmp / name).write_bytes(data)
            files[name] = (len(data), checksum_bytes(data))
        on_disk = file_sizes(tmp)  # a file no writer reported (left by an earlier failed attempt) is not listed
        for name, size in on_disk.items():
            if name not in files:
                continue
            if files[name][0] != size:
                raise CommitError(f"{tmp / name} is {size} bytes, its writer hashed {files[name][0]}")
            if not name.endswith(".distcp"):  # DCP fsynced its shards
                with (tmp / name).open("rb") as fh:
                    os.fsync(fh.fileno())
        missing = sorted(set(files) - set(on_disk))
        if missing:
            raise CommitError(f"{tmp}: {missing[0]} was written but is gone")
        (tmp / COMMIT_MARKER).write_text(marker_text(files))
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. final save after a signal)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        self._verified.add(_key(final))  # its bytes were hashed as they were written
        self._broken.discard(_key(final))
        self._retain()

    def _retain(self) -> None:
        """Keep the newest `keep` verified checkpoints; delete only what is older than all of
        them. A broken checkpoint never counts; with fewer than `keep` verified, delete nothing."""
        kept: list[Path] = []
        for path in reversed(self.committed()):
            if _key(path) not in self._broken and (_key(path) in self._verified or self._verify_here(path)):
                kept.append(path)
                if len(kept) == self.keep:
                    break
        if len(kept) < self.keep:
            return
        for old in self.committed():
            if step_of(old) < step_of(kept[-1]):
                shutil.rmtree(old, ignore_errors=True)

    def _verify_here(self, path: Path) -> bool:
        """Rank 0 alone: a checkpoint not written or checked by this process, verified once."""
        good = check_checkpoint(path) is None
        (self._verified if good else self._broken).add(_key(path))
        return good

    # ---- loading -------------------------------------------------------------------------
    def load(self, found: Found) -> None:
        """Collective: every registered state from the checkpoint. DCP reshards the sharded ones
        onto the current layout; per-rank states on another world size take rank 0's."""
        saved_world = found.trainer_state.get("world_size")
        missing = [name for name, s in self.states.items() if _is_json_state(s) and name not in found.trainer_state]
        if missing:
            raise NoCheckpointError(f"{found.path}: {TRAINER_STATE} has no state for {missing[0]!r}")
        sharded = {name: s.state_dict() for name, s in self.states.items() if isinstance(s, ShardedState)}
        dcp.load(sharded, checkpoint_id=str(found.path))
        notes = []
        for name, state in self.states.items():
            if isinstance(state, ShardedState):
                state.load_state_dict(sharded[name])
            elif isinstance(state, PerRankState):
                same = saved_world == self.world_size
                path = found.path / per_rank_file(name, self.rank if same else 0)
                if not path.is_file():
                    raise NoCheckpointError(f"{found.path}: missing {path.name}")
                state.load_state_dict(torch.load(path, weights_only=True), same_rank=same)
                if not same:
                    notes.append(name)
            else:
                state.load_state_dict(found.trainer_state[name])
        if notes:
            self.resume_note = (
                f"world size {saved_world} -> {self.world_size}: every rank continues rank 0's {', '.join(notes)} "
                "state, per-rank streams are not restored; data order exact"
            )


def _key(path: Path) -> str:
    return str(path.resolve())


def _is_json_state(state: Stateful) -> bool:
    return not isinstance(state, (ShardedState, PerRankState))


def _save_torch(obj: Any, directory: Path, name: str, rank: int) -> tuple[int, str]:
    """torch.save into the checkpoint, hashing on the way; -> (size, checksum)."""
    with (directory / per_rank_file(name, rank)).open("wb") as raw:
        stream = HashingStream(raw)
        torch.save(obj, stream)
        stream.flush()
    return stream.hasher.size, stream.hasher.hexdigest()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
