"""What the benchmarks and the multi-process tests share: spawning gloo ranks on this machine,
timing variants side by side, and printing markdown tables.

It lives with the benchmarks in scripts/, which the tests already use, so scripts and tests import
one copy (`from scripts.benchlib import run_ranks`) and the shipped packages carry no bench tools.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import reduction
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What every rank imports. The fork server imports these once per parent process and forks each
# rank from there: a rank starts in well under a second instead of re-importing torch and the
# framework (5+ s of CPU per rank on a busy 2-core machine, most of a short multi-process test).
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "omegaconf", "framework.train"]


class _ParentStdio:
    """This process's stdout and stderr as they are now, for a rank to write to: a spawned rank
    inherits them at start (so pytest's capfd sees its output), a fork-server rank would write
    wherever the server's pointed. Pickled for the fork server, it becomes two fds passed along."""

    def __reduce__(self):
        return tuple, ((reduction.DupFd(1), reduction.DupFd(2)),)


def _rank_entry(
    rank: int,
    world: int,
    fn: Callable,
    args: tuple,
    out_dir: str,
    threads: int,
    timeout_s: float,
    device: str,
    environ: dict[str, str],
    stdio: tuple,
) -> None:
    for fd, parent_fd in zip((1, 2), stdio, strict=True):
        passed = parent_fd.detach()
        os.dup2(passed, fd)
        os.close(passed)
    # The fork server's environment is the parent's when the server started: take the parent's
    # as of this call (a test's monkeypatch.setenv reaches the ranks, as with spawn).
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    code = 0
    try:
        # A file store, not a TCP port: no port picked in the parent can be taken by another
        # process before rank 0 binds it (EADDRINUSE on a busy machine); gloo binds its own.
        store = f"file://{Path(out_dir) / 'store'}"
        timeout = datetime.timedelta(seconds=timeout_s)
        backend = "gloo"
        if device == "cuda":  # NCCL, one GPU per rank (the GPU checks); cpu: gloo even where a GPU is visible
            torch.cuda.set_device(rank % torch.cuda.device_count())
            backend = "nccl"
        dist.init_process_group(backend, init_method=store, rank=rank, world_size=world, timeout=timeout)
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo threads can abort the interpreter at exit (framework.distributed.shutdown)


def run_ranks(
    fn: Callable, world: int, *args: object, timeout_s: float = 300, threads: int = 1, device: str = "cpu"
) -> list:
    """Run fn(rank, world, *args) on `world` spawned processes in one gloo process group, each
    with `threads` compute threads; -> every rank's return value, in rank order.

    fn must be a module-level function (spawn pickles it by name) returning tensors or plain
    data (read back with weights_only=True). A rank that raises prints its traceback; then this
    raises RuntimeError with every rank's exit code. Ranks still running after timeout_s are killed."""
    with tempfile.TemporaryDirectory() as out_dir:
        # forkserver, not fork: the server has only imported modules (no threads, no CUDA, no
        # process group), so a rank starts as clean as a spawned one; cwd and sys.path come over too.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        environ = dict(os.environ)
        procs = [
            ctx.Process(
                target=_rank_entry,
                args=(r, world, fn, args, out_dir, threads, timeout_s, device, environ, _ParentStdio()),
            )
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        codes = [p.exitcode for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if codes != [0] * world:
            late = " (None: still running after timeout_s, killed)" if None in codes else ""
            raise RuntimeError(f"{fn.__name__} on {world} ranks: exit codes {codes}{late}")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def rotated(items: Sequence, turn: int) -> list:
    """items starting at position turn % len: run variants in an order that changes every round."""
    shift = turn % len(items)
    return list(items[shift:]) + list(items[:shift])


def time_side_by_side(fns: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Warm every variant up, then interleave the timed repetitions (variant order rotates each
    round) so machine noise and drift hit all variants alike. -> seconds per repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(reps):
        for n in rotated(list(fns), r):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def time_collective(fn: Callable[[], None]) -> float:
    """This rank's wall time of a region every rank runs, with barriers on both sides: on rank
    0 that is the slowest rank's time, which is what the step loses."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 0) -> None:
    """A markdown table; the first `left` columns are left-aligned, the rest (numbers) right."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * left + "---:|" * (len(header) - left))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
