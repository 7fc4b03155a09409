"""Benchmark checkpointing (CPU, gloo, FSDP2): sync save vs one plain sequential write, async blocking, load.
Checks the issue's goals on 1 and 2 processes: sync save >= 70% of the plain write, async blocks <= 10% of sync.
Sync saves run with 1 and 2 DCP writer threads side by side, and with 2 threads minus the content checksums
(their cost); async saves reuse one manager, as a run does; loads include verifying every file's checksum."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from checkpoint.checksum import ALGORITHM  # noqa: E402
from parallel.shards import full_tensor, local_shard  # noqa: E402
from scripts.benchlib import print_table, rotated, run_ranks, time_collective  # noqa: E402

MB, GB = 1e6, 1e9
SYNC_GOAL, ASYNC_GOAL = 0.70, 0.10
THREAD_COUNTS = (1, 2)  # DCP writer threads per rank: DCP's default, and ours
DEFAULT_THREADS = 2  # checkpoint.write_threads' default
WORKER_TIMEOUT_S = 900


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=str, default="1,2", help="process counts to run, comma-separated")
    p.add_argument("--reps", type=int, default=9, help="timed repetitions per process count (median reported)")
    p.add_argument("--dir", type=str, default=tempfile.gettempdir(), help="where checkpoints are written")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--ffn-dim", type=int, default=1536, help="hidden size of the dense SwiGLU block")
    p.add_argument("--experts", type=int, default=8, help="routed experts per MoE block")
    p.add_argument("--expert-dim", type=int, default=256, help="hidden size of one expert")
    p.add_argument("--seq", type=int, default=64, help="tokens per row of the one training step")
    p.add_argument("--batch", type=int, default=2, help="rows per rank of the one training step")
    p.add_argument("--quick", action="store_true", help="a few-MB model, 1 repetition: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.dim, args.layers, args.heads, args.vocab, args.ffn_dim = 128, 2, 4, 512, 256
        args.experts, args.expert_dim, args.seq, args.reps = 8, 64, 16, 1
    args.worlds = [int(w) for w in args.worlds.split(",")]
    if args.reps < 1 or any(w < 1 for w in args.worlds):
        p.error("--reps and every --worlds entry must be >= 1")
    return args


def model_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads, vocab_size=args.vocab,
        seq_len=args.seq, ffn_dim=args.ffn_dim, num_experts=args.experts, num_shared_experts=1, top_k=2,
        expert_dim=args.expert_dim, first_k_dense=1,
    )  # fmt: skip


# ----------------------------------------------------------------------------- worker


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _plain_write(path: Path, buf: bytes) -> None:
    """The disk's practical limit: one sequential write of the same bytes, then fsync."""
    with open(path, "wb") as f:
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())


class _Phases:
    """Seconds this rank spends inside chosen library functions, summed per label. The functions
    are wrapped in place in this worker process only; the wrapper adds a perf_counter pair."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._lock = threading.Lock()  # async saves write from DCP's background thread

    def wrap(self, owner: object, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                with self._lock:
                    self._seconds[label] = self._seconds.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        with self._lock:
            out, self._seconds = self._seconds, {}
        return out


def _install_phases() -> _Phases:
    import torch.distributed.checkpoint as dcp
    import torch.distributed.checkpoint.filesystem as fs

    import checkpoint.checksum as checksum_mod
    import checkpoint.manager as manager_mod
    import checkpoint.state as state_mod

    ph = _Phases()
    for cls in (state_mod.ModelState, state_mod.OptimizerState):
        ph.wrap(cls, "state_dict", "state_dict")
        ph.wrap(cls, "load_state_dict", "set_state_dict")
    ph.wrap(manager_mod.CheckpointManager, "_commit", "commit")
    ph.wrap(manager_mod.CheckpointManager, "_verify", "verify")
    ph.wrap(checksum_mod.Hasher, "update", "hash")  # summed over the threads that write
    ph.wrap(dcp, "save", "dcp_save")
    ph.wrap(dcp, "async_save", "dcp_async_save")
    ph.wrap(dcp, "load", "dcp_load")
    ph.wrap(fs._FileSystemWriter, "write_data", "write")
    ph.wrap(fs._FileSystemWriter, "finish", "metadata")
    ph.wrap(fs.FileSystemReader, "read_data", "read")
    return ph


def _evict(path: Path) -> None:
    """Drop these (already fsynced) files from this machine's page cache: a cold read next."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class _NoChecksums:
    """Within it, the checksum hashers count bytes but skip the hashing: a sync save without checksums."""

    def __enter__(self):
        from checkpoint.checksum import Hasher

        def count_only(self, data) -> None:  # the commit still checks every file's size
            self.size += memoryview(data).nbytes

        self._update, Hasher.update = Hasher.update, count_only

    def __exit__(self, *exc):
        from checkpoint.checksum import Hasher

        Hasher.update = self._update


def _measure(rank: int, world: int, cfg: dict) -> dict:
    from checkpoint.checksum import checksum_bytes
    from checkpoint.manager import CheckpointManager
    from checkpoint.state import AttributeState, ModelState, OptimizerState, RngState
    from framework.loss import TrainingLoss
    from framework.model.args import ModelArgs
    from framework.model.transformer import MoETransformer
    from framework.optim import build_optimizer
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.fsdp import apply_fsdp
    from parallel.layout import resolve_layout
    from parallel.mesh import build_expert_mesh, build_mesh, dp_mesh, expert_dp_mesh

    phases = _install_phases()
    cpu = torch.device("cpu")
    layout = resolve_layout(world, 1, "auto", -1, 1)
    mesh, expert_mesh = build_mesh(layout, cpu), build_expert_mesh(layout, cpu)
    optim_cfg = SimpleNamespace(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    args = ModelArgs(**cfg["model"])

    def build(seed: int):
        """As the Trainer does it: full init on every rank, EP (a no-op at ep=1), FSDP2, AdamW."""
        model = MoETransformer(args)
        model.init_weights(seed)
        apply_expert_parallel(model, expert_mesh, world)
        apply_fsdp(model, dp_mesh(mesh), expert_dp_mesh(expert_mesh), "fp32")
        return model, build_optimizer(model, optim_cfg)

    model, optimizer = build(0)
    gen = torch.Generator().manual_seed(1000 + rank)
    tokens = torch.randint(0, args.vocab_size, (cfg["batch"], args.seq_len + 1), generator=gen)
    TrainingLoss(args.mtp_weight)(
        model(tokens[:, :-1]), tokens[:, 1:]
    ).backward()  # one step, so AdamW's exp_avg / exp_avg_sq exist
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # Training state: this rank's shards of params + optimizer state, summed over ranks.
    local_state = [local_shard(p) for p in model.parameters()]
    local_state += [local_shard(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    totals = torch.tensor([float(sum(t.numel() * t.element_size() for t in local_state))], dtype=torch.float64)
    dist.all_reduce(totals)
    n_params = sum(p.numel() for p in model.parameters())  # DTensors: the global count

    # What a load must reproduce: one dense and one expert weight, and their AdamW state.
    named = dict(model.named_parameters())
    check_names = [n for n in ("layers.0.attn.wq.weight", "layers.1.ffn.experts.w1") if n in named]
    reference = {}
    for n in check_names:
        st = optimizer.state[named[n]]
        reference[n] = (full_tensor(named[n]), full_tensor(st["exp_avg"]), full_tensor(st["exp_avg_sq"]))

    base = Path(cfg["base"])
    counters = SimpleNamespace(step=1, wandb_run_id=None)

    def states(model, optimizer) -> dict:
        """What the Trainer registers, less its sampler and scheduler (small JSON, as counters)."""
        return {
            "model": ModelState(model),
            "optim": OptimizerState(model, optimizer),
            "trainer": AttributeState(counters, "step", "wandb_run_id"),
            "rng": RngState(),
        }

    def load_and_check(run_dir: Path) -> tuple[float, dict]:
        model2, opt2 = build(1)  # other weights, no optimizer state: the load has to fill both
        named2 = dict(model2.named_parameters())
        for n in check_names:
            if torch.equal(full_tensor(named2[n]), reference[n][0]):
                raise RuntimeError(f"{n}: the fresh model already equals the saved one; the check would be empty")
        manager = CheckpointManager(
            run_dir, states(model2, opt2), keep=1, async_save=False, rank=rank, world_size=world
        )

        def do_load() -> None:
            manager.load(manager.find("auto"))  # find() verifies every file's checksum

        phases.take()
        seconds = time_collective(do_load)
        spent = phases.take()
        for n in check_names:
            st = opt2.state[named2[n]]
            got = (full_tensor(named2[n]), full_tensor(st["exp_avg"]), full_tensor(st["exp_avg_sq"]))
            for what, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, reference[n], strict=True):
                if not torch.equal(a, b):
                    raise RuntimeError(f"load check failed: {n} {what} differs from the saved tensor")
        return seconds, spent  # model2 and opt2 are dropped here

    def fwd_bwd() -> None:
        """The part of a training step that may overlap an async save's copy (no optimizer
        step: the weights must stay as saved for the load check)."""
        TrainingLoss(args.mtp_weight)(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        optimizer.zero_grad(set_to_none=True)

    # One async manager for the whole benchmark, as in a training run: its stager allocates
    # host buffers at the first save and reuses them after.
    async_mgr = CheckpointManager(
        base / f"w{world}-async",
        states(model, optimizer),
        keep=1,
        async_save=True,
        rank=rank,
        world_size=world,
        write_threads=DEFAULT_THREADS,
    )

    def one_round(index: int, name: str, plain_buf: bytes | None, plain: bool = True) -> dict:
        """Plain write and a sync save per writer-thread count (order rotating per round), then
        an async save overlapped by a forward/backward, its fence and finish, and loads."""
        out: dict = {"phases": {}, "sync": {}}
        plain_file = base / f"w{world}-{name}.bin"

        def timed_phases(key: str, fn) -> float:
            phases.take()
            seconds = time_collective(fn)
            out["phases"][key] = phases.take()
            return seconds

        def plain_write() -> None:  # every rank takes the barriers; rank 0 alone writes
            if not plain:  # the warm-up round: the size is not known yet
                return
            out["plain"] = time_collective(lambda: _plain_write(plain_file, plain_buf) if rank == 0 else None)
            if rank == 0:
                plain_file.unlink()
                t0 = time.perf_counter()
                checksum_bytes(plain_buf)
                out["hash"] = time.perf_counter() - t0  # the checksum of the same bytes, one thread, in memory

        def sync_save(threads: int, checksums: bool = True) -> None:
            key = threads if checksums else "nohash"
            sync_dir = base / f"w{world}-{name}-sync{key}"
            mgr = CheckpointManager(
                sync_dir, states(model, optimizer), 1, False, rank=rank, world_size=world, write_threads=threads
            )
            with _NoChecksums() if not checksums else contextlib.nullcontext():
                out["sync"][key] = timed_phases(f"sync{key}", lambda: mgr.save(1))
            if rank == 0:
                out["ckpt_bytes"] = _dir_bytes(sync_dir / "checkpoints")
                shutil.rmtree(sync_dir)
            dist.barrier()

        steps = [plain_write] + [functools.partial(sync_save, t) for t in THREAD_COUNTS]
        steps.append(functools.partial(sync_save, DEFAULT_THREADS, checksums=False))
        for fn in rotated(steps, index):
            fn()

        out["compute"] = time_collective(fwd_bwd)
        counters.step = index + 1
        out["block_call"] = timed_phases("block", lambda: async_mgr.save(index + 1))
        out["overlap_compute"] = time_collective(fwd_bwd)
        out["block_fence"] = time_collective(async_mgr.wait_staged)
        out["block"] = out["block_call"] + out["block_fence"]
        out["finish"] = timed_phases("finish", async_mgr.wait)
        out["load"], out["phases"]["load"] = load_and_check(async_mgr.root.parent)
        gc.collect()
        if rank == 0:
            _evict(async_mgr.root)
        out["cold_load"], out["phases"]["cold_load"] = load_and_check(async_mgr.root.parent)
        gc.collect()
        dist.barrier()
        return out

    # Warm-up round (untimed): first-call costs, and the checkpoint's size for the plain write.
    # It is also the async manager's first save, which allocates the staging buffers.
    warm = one_round(0, "warmup", None, plain=False)
    nbytes = torch.tensor([warm.get("ckpt_bytes", 0)], dtype=torch.int64)
    dist.broadcast(nbytes, 0)
    plain_buf = os.urandom(int(nbytes.item())) if rank == 0 else None  # random: nothing to compress or skip
    rounds = [one_round(i + 1, f"rep{i}", plain_buf) for i in range(cfg["reps"])]
    async_mgr.close()
    if rank != 0:
        return {}
    return {
        "n_params": n_params,
        "state_bytes": int(totals.item()),
        "ckpt_bytes": int(nbytes.item()),
        "first_block": warm["block"],
        "rounds": rounds,
        "checked": check_names,
    }


# ----------------------------------------------------------------------------- parent


def run_world(world: int, cfg: dict) -> dict:
    """-> rank 0's numbers for `world` processes, which share this machine's cores."""
    threads = max(1, (os.cpu_count() or 1) // world)
    return run_ranks(_measure, world, cfg, timeout_s=WORKER_TIMEOUT_S, threads=threads)[0]


def filesystem_of(path: str) -> str:
    """'MOUNTPOINT (TYPE on DEVICE)' of the mount holding path, from /proc/mounts."""
    real, best = os.path.realpath(path), ("?", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and (best[1] == "?" or len(mnt) > len(best[1])):
                    best = (dev, mnt, fstype)
    except OSError:
        pass
    return f"{best[1]} ({best[2]} on {best[0]})"


def main() -> int:
    args = parse_args()
    base = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    cfg = {"model": model_kwargs(args), "batch": args.batch, "reps": args.reps, "base": base}
    t_start = time.perf_counter()
    results = {}
    try:
        for world in args.worlds:
            results[world] = run_world(world, cfg)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    wall = time.perf_counter() - t_start

    first = results[args.worlds[0]]
    med = {world: summarize(r) for world, r in results.items()}
    d = DEFAULT_THREADS

    print(
        f"# Checkpoint save/load, CPU + gloo + FSDP2 fp32, torch {torch.__version__}, {os.cpu_count()} cores; "
        f"MoETransformer dim={args.dim} layers={args.layers} experts={args.experts}x{args.expert_dim} "
        f"vocab={args.vocab}: {first['n_params']:,} params; training state (params + AdamW exp_avg/exp_avg_sq/step) "
        f"{first['state_bytes']:,} bytes = {first['state_bytes'] / MB:.1f} MB"
    )
    print(
        f"# written under {base} (deleted afterwards) on filesystem {filesystem_of(base)}; checkpoint dir "
        f"{first['ckpt_bytes']:,} bytes = {first['ckpt_bytes'] / MB:.1f} MB (DCP shards + metadata + RNG + "
        f"trainer state + marker); 1 untimed warm-up round, then {args.reps} timed round(s) per process count, "
        "median; times are rank 0's wall time between barriers; MB/GB = 1e6/1e9 bytes"
    )
    if args.quick:
        print("# --quick: a few-MB model, 1 round; fixed costs dominate: a smoke test, not a verdict on the goals")
    elif first["state_bytes"] < 200 * MB:
        print(f"# WARNING: the training state is under 200 MB ({first['state_bytes'] / MB:.1f} MB): raise the sizes")
    print()
    print("Sync save vs one plain sequential write of the same bytes (the disk's practical limit)")
    print()
    header = ["processes", "state MB", "plain write s", "plain GB/s"]
    for t in THREAD_COUNTS:
        header += [f"sync, {t} writer thread{'s' if t > 1 else ''} s", "sync / plain"]
    header += [f"sync, {d} threads, no checksums s", "checksum cost", "hashing in the save s", "hash alone s"]
    header += ["load s", "cold load s", "verify in load s"]
    rows = []
    for world, m in med.items():
        row = [world, f"{results[world]['state_bytes'] / MB:.1f}", f"{m['plain']:.3f}", f"{m['plain_gbs']:.2f}"]
        for t in THREAD_COUNTS:
            row += [f"{m['sync'][t]:.3f}", f"{100 * m['sync_vs_plain'][t]:.0f}%"]
        row += [f"{m['sync']['nohash']:.3f}", f"{100 * m['checksum_cost']:+.0f}%"]
        row += [f"{m['phases'][f'sync{d}']['hash']:.3f}", f"{m['hash']:.3f}"]
        row += [f"{m['load']:.3f}", f"{m['cold_load']:.3f}", f"{m['phases']['load']['verify']:.3f}"]
        rows.append(row)
    print_table(header, rows)
    print()
    print(f"Async save ({d} writer threads), the manager reused across saves as in a training run")
    print()
    header = ["processes", "first save blocks s", "save() s", "fence s", "blocks s", "blocks / sync"]
    header += ["fwd+bwd alone s", "fwd+bwd overlapping s", "finish s"]
    rows = [
        [world, f"{results[world]['first_block']:.3f}", f"{m['block_call']:.3f}", f"{m['block_fence']:.3f}"]
        + [f"{m['block']:.3f}", f"{100 * m['block_vs_sync']:.1f}%", f"{m['compute']:.3f}"]
        + [f"{m['overlap_compute']:.3f}", f"{m['finish']:.3f}"]
        for world, m in med.items()
    ]
    print_table(header, rows)
    print()
    print(
        "- sync save: CheckpointManager.save(async_save=False, write_threads=N) until committed (DCP write with "
        "fsync, then rank 0 fsyncs the small files, writes COMMITTED, renames, fsyncs the dirs). plain write: "
        "rank 0 alone, one f.write of a preallocated random buffer of the same size + fsync. The plain write and "
        "the sync saves run in an order that rotates every round; sync / plain is the median of per-round ratios"
    )
    print(
        f"- checksums: every file is hashed ({ALGORITHM}) as DCP's writer threads write it. checksum cost: "
        f"the median per-round (sync with - sync without) / sync without, {d} threads (disk noise included); "
        "hashing in the save: rank 0's seconds inside the hash calls of that save, summed over its writer threads "
        "(they overlap each other and the writes); hash alone: rank 0 "
        "hashing a buffer of the checkpoint's size in memory on one thread (what the writer threads spread "
        "over themselves); verify in load: find() re-hashing every file, each rank its share"
    )
    print(
        "- async: save() returns once the state dict is taken and the background copy started; then one "
        f"forward+backward ({args.batch} x {args.seq} tokens per rank) runs while the copy and the write go on; "
        "fence = wait_staged(), what the trainer waits before optimizer.step(); blocks = save() + fence, "
        "blocks / sync against the sync save with the same writer threads; first save blocks: the same for the "
        "first save of the run (the warm-up round), which allocates the host buffers; finish: wait() for the rest "
        "of the write + commit; fwd+bwd alone vs overlapping: the same pass without and with the save in the "
        "background (what the background work costs the step on shared cores)"
    )
    print(
        "- load: find('auto') + load() into a fresh model + optimizer, checked equal (param, exp_avg, exp_avg_sq "
        f"of {', '.join(first['checked'])}) to the saved state; cold load: the same after evicting the files "
        "from the page cache"
    )
    for world, m in med.items():
        ph = m["phases"]
        print(
            f"- {world} process(es), where rank 0's time goes (medians, s): sync save ({d} threads) {m['sync'][d]:.3f}"
            f" = state_dict {ph[f'sync{d}']['state_dict']:.3f} + dcp.save {ph[f'sync{d}']['dcp_save']:.3f} "
            f"(file writes with fsync {ph[f'sync{d}']['write']:.3f}, metadata {ph[f'sync{d}']['metadata']:.3f}) + "
            f"commit {ph[f'sync{d}']['commit']:.3f}; async save() {m['block_call']:.3f} = state_dict "
            f"{ph['block']['state_dict']:.3f} + dcp.async_save {ph['block']['dcp_async_save']:.3f} + other "
            f"{m['block_other']:.3f}; wait() {m['finish']:.3f} (commit {ph['finish']['commit']:.3f}); load "
            f"{m['load']:.3f} = verify {ph['load']['verify']:.3f} + state_dict {ph['load']['state_dict']:.3f} + "
            f"dcp.load {ph['load']['dcp_load']:.3f} (file reads {ph['load']['read']:.3f}) + load_state_dict "
            f"{ph['load']['set_state_dict']:.3f}"
        )
    for world, r in results.items():
        print(
            f"- {world} process(es), per round plain / "
            + " / ".join(f"sync{t}" for t in THREAD_COUNTS)
            + " / async blocks s: "
            + "; ".join(
                f"{x['plain']:.2f}/" + "/".join(f"{x['sync'][t]:.2f}" for t in THREAD_COUNTS) + f"/{x['block']:.3f}"
                for x in r["rounds"]
            )
        )
    print()

    sync_ok = all(m["sync_vs_plain"][d] >= SYNC_GOAL for m in med.values())
    async_ok = all(m["block_vs_sync"] <= ASYNC_GOAL for m in med.values())
    per = ", ".join(
        f"{w} proc {100 * m['sync_vs_plain'][d]:.0f}% (rounds {100 * m['sync_vs_plain_lo']:.0f}-"
        f"{100 * m['sync_vs_plain_hi']:.0f}%; 1 thread {100 * m['sync_vs_plain'][1]:.0f}%)"
        for w, m in med.items()
    )
    print(
        f"- goal: sync save ({d} writer threads) >= {100 * SYNC_GOAL:.0f}% of the plain write: "
        f"{'MET' if sync_ok else 'NOT MET'} ({per})"
    )
    per = ", ".join(
        f"{w} proc {100 * m['block_vs_sync']:.1f}% (rounds {100 * m['block_vs_sync_lo']:.1f}-"
        f"{100 * m['block_vs_sync_hi']:.1f}%)"
        for w, m in med.items()
    )
    print(
        f"- goal: async save blocks <= {100 * ASYNC_GOAL:.0f}% of the sync save time: "
        f"{'MET' if async_ok else 'NOT MET'} ({per})"
    )
    print(f"- total wall time {wall:.0f} s (process spawn, model builds and the warm-up round included)")
    return 0


def summarize(r: dict) -> dict:
    """Medians over rounds of every time and of every phase inside each timed region."""
    rounds = r["rounds"]
    d = DEFAULT_THREADS
    keys = ("plain", "block", "block_call", "block_fence", "finish", "load", "cold_load", "compute")
    keys += ("overlap_compute", "hash")
    m = {k: statistics.median(x[k] for x in rounds) for k in keys}
    m["sync"] = {t: statistics.median(x["sync"][t] for x in rounds) for t in (*THREAD_COUNTS, "nohash")}
    m["checksum_cost"] = statistics.median(x["sync"][d] / x["sync"]["nohash"] - 1 for x in rounds)
    labels = ("state_dict", "set_state_dict", "commit", "dcp_save", "dcp_async_save", "dcp_load")
    labels += ("write", "metadata", "read", "verify", "hash")
    regions = [f"sync{t}" for t in THREAD_COUNTS] + ["block", "finish", "load", "cold_load"]
    m["phases"] = {
        reg: {lab: statistics.median(x["phases"][reg].get(lab, 0.0) for x in rounds) for lab in labels}
        for reg in regions
    }
    m["block_other"] = statistics.median(
        x["block_call"] - sum(x["phases"]["block"].get(k, 0.0) for k in ("state_dict", "dcp_async_save"))
        for x in rounds
    )
    m["plain_gbs"] = r["ckpt_bytes"] / m["plain"] / GB
    # Ratios per round (each pair measured in the same round), then the median.
    m["sync_vs_plain"] = {t: statistics.median(x["plain"] / x["sync"][t] for x in rounds) for t in THREAD_COUNTS}
    m["block_vs_sync"] = statistics.median(x["block"] / x["sync"][d] for x in rounds)
    for key, ratios in (
        ("sync_vs_plain", [x["plain"] / x["sync"][d] for x in rounds]),
        ("block_vs_sync", [x["block"] / x["sync"][d] for x in rounds]),
    ):
        m[key + "_lo"], m[key + "_hi"] = min(ratios), max(ratios)
    return m


if __name__ == "__main__":
    sys.exit(main())
