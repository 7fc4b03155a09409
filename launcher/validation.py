"""Cross-field checks on a composed config, run before any process starts.

The schema already caught unknown keys and wrong types; this catches impossible values
(top_k > num_experts, a layout that does not multiply up, a missing data file, ...).
"""

from __future__ import annotations

import copy
import json
import math
import netrc
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import DictConfig

from checkpoint.commit import check_complete
from framework.model.args import SCORE_FUNCS
from launcher.errors import ConfigError
from launcher.run_dir import PROJECT_DIR
from launcher.token_check import check_token_files
from parallel.layout import PIPELINE_SCHEDULES, Layout, resolve_layout
from parallel.pipeline import model_pieces, plan_stages
from parallel.pipeline.schedules import check_schedule_args
from parallel.plan import ACTIVATION_CHECKPOINTING

PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw",)
DATA_SOURCES = ("file", "synthetic")
LAUNCHERS = ("local", "slurm")
WANDB_MODES = ("disabled", "offline", "online")
ON_NAN = ("stop", "skip")
RESUME_MODES = ("auto", "never", "overwrite")
DEVICES = ("auto", "cpu", "cuda")
CPU_PROCS_FLOOR = 8  # gloo tests run up to 8 ranks even on a 2-core machine


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {allowed}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, value, f"allowed: {', '.join(allowed)}")


def _positive(section: DictConfig, prefix: str, *keys: str) -> None:
    for key in keys:
        _require(section[key] > 0, f"{prefix}.{key}", section[key], "must be > 0")


def _non_negative(section: DictConfig, prefix: str, *keys: str) -> None:
    for key in keys:
        _require(section[key] >= 0, f"{prefix}.{key}", section[key], "must be >= 0")


def local_gpu_count() -> int:
    """GPUs this node shows, without importing torch (the launcher stays tensor-free)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def validate_model(m: DictConfig) -> None:
    _positive(m, "model", "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim")
    _positive(m, "model", "num_experts", "top_k", "expert_dim", "n_groups", "topk_groups", "route_scale")
    _positive(m, "model", "rope_theta", "norm_eps", "init_std")
    _non_negative(m, "model", "num_shared_experts", "first_k_dense", "bias_update_speed")
    _non_negative(m, "model", "aux_loss_alpha", "mtp_depth", "mtp_weight")
    _require(m.dim % m.n_heads == 0, "model.dim", m.dim, f"must be divisible by model.n_heads={m.n_heads}")
    _require(
        (m.dim // m.n_heads) % 2 == 0,
        "model.dim",
        m.dim,
        f"head size dim/n_heads={m.dim // m.n_heads} must be even for RoPE",
    )
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")
    _require(m.top_k <= m.num_experts, "model.top_k", m.top_k, f"must be <= model.num_experts={m.num_experts}")
    _require(
        m.num_experts % m.n_groups == 0, "model.n_groups", m.n_groups, f"must divide model.num_experts={m.num_experts}"
    )
    _require(m.topk_groups <= m.n_groups, "model.topk_groups", m.topk_groups, f"must be <= model.n_groups={m.n_groups}")
    reachable = m.topk_groups * (m.num_experts // m.n_groups)
    _require(
        m.top_k <= reachable,
        "model.top_k",
        m.top_k,
        f"must be <= topk_groups x experts per group = {reachable}",
    )
    _require(
        m.first_k_dense <= m.n_layers, "model.first_k_dense", m.first_k_dense, f"must be <= model.n_layers={m.n_layers}"
    )
    _one_of("model.score_func", m.score_func, SCORE_FUNCS)
    _require(m.seq_len > m.mtp_depth + 1, "model.seq_len", m.seq_len, f"must be > mtp_depth + 1 = {m.mtp_depth + 1}")


def validate_layout(cfg: DictConfig) -> Layout:
    p, launch = cfg.parallel, cfg.launcher
    world = launch.nproc_per_node * launch.nnodes
    _one_of("parallel.pp_schedule", p.pp_schedule, PIPELINE_SCHEDULES)
    _require(
        isinstance(p.pp_virtual_stages, int) and not isinstance(p.pp_virtual_stages, bool) and p.pp_virtual_stages >= 2,
        "parallel.pp_virtual_stages",
        p.pp_virtual_stages,
        "must be an integer >= 2 (stages per pipeline rank for interleaved_1f1b)",
    )
    try:  # the same call every rank makes on the same values (framework/train.py)
        layout = resolve_layout(world, p.pp, p.dp_replicate, p.dp_shard, p.ep)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    m = cfg.model
    _require(
        m.num_experts % layout.ep == 0,
        "model.num_experts",
        m.num_experts,
        f"must be divisible by parallel.ep={layout.ep}",
    )
    _non_negative(p, "parallel", "ep_per_node")
    ep_per_node = min(layout.ep, p.ep_per_node or launch.nproc_per_node)
    _require(
        layout.ep % ep_per_node == 0,
        "parallel.ep_per_node",
        p.ep_per_node,
        f"must divide parallel.ep={layout.ep} (EP ranks per node)",
    )
    nodes = layout.ep // ep_per_node
    if m.n_groups > 1 and nodes > 1:
        # Node-limited routing: every expert group must sit on one node.
        _require(
            m.n_groups % nodes == 0,
            "model.n_groups",
            m.n_groups,
            f"must be a multiple of the {nodes} nodes an expert-parallel group spans "
            f"(ep={layout.ep} / ep_per_node={ep_per_node}), so each expert group lies on one node",
        )
    return layout


def validate_train(cfg: DictConfig, layout: Layout) -> None:
    t, o = cfg.train, cfg.optim
    _positive(t, "train", "steps", "global_batch_size", "micro_batch_size", "log_every", "eval_every", "eval_batches")
    _positive(t, "train", "collective_timeout_s")
    _one_of("train.precision", t.precision, PRECISIONS)
    _one_of("train.activation_checkpointing", t.activation_checkpointing, ACTIVATION_CHECKPOINTING)
    per_rank = t.global_batch_size // layout.dp
    _require(
        t.global_batch_size % layout.dp == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"must be divisible by the {layout.dp} data-parallel ranks",
    )
    _require(
        per_rank % t.micro_batch_size == 0,
        "train.micro_batch_size",
        t.micro_batch_size,
        f"must divide the per-rank batch global_batch_size/dp = {per_rank}",
    )
    _one_of("optim.name", o.name, OPTIMIZERS)
    _one_of("optim.schedule", o.schedule, LR_SCHEDULES)
    _positive(o, "optim", "lr", "eps")
    _non_negative(o, "optim", "weight_decay", "warmup_steps", "grad_clip")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    for key in ("beta1", "beta2"):
        _require(0 <= o[key] < 1, f"optim.{key}", o[key], "must be in [0, 1)")


def validate_pipeline(cfg: DictConfig, layout: Layout) -> None:
    """pp > 1: the schedule must run on these sizes, and the stage cut must fit the model."""
    if layout.pp == 1:
        return
    p, t = cfg.parallel, cfg.train
    microbatches = t.global_batch_size // layout.dp // t.micro_batch_size
    try:
        check_schedule_args(p.pp_schedule, layout.pp, microbatches, p.pp_virtual_stages)
    except ValueError as err:
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule} with {microbatches} micro-batches "
            f"(global_batch_size / dp / micro_batch_size): {err}"
        ) from None
    try:
        plan_stages(model_pieces(cfg.model), p.pp_schedule, layout.pp, p.pp_virtual_stages)  # the cut must fit
    except ValueError as err:  # the stage count, not the micro-batches, is what does not fit
        raise ConfigError(
            f"parallel.pp_schedule={p.pp_schedule} with parallel.pp={layout.pp}"
            f"{f' x pp_virtual_stages={p.pp_virtual_stages}' if p.pp_schedule == 'interleaved_1f1b' else ''} and "
            f"model.n_layers={cfg.model.n_layers}: {err}"
        ) from None


def validate_data(cfg: DictConfig) -> None:
    d = cfg.data
    _one_of("data.source", d.source, DATA_SOURCES)
    if d.source == "synthetic":
        need = 2 * (cfg.model.seq_len + 1)
        _require(d.synthetic_tokens >= need, "data.synthetic_tokens", d.synthetic_tokens, f"must be >= {need}")
        return
    root = Path(d.path)
    for split in ("train", "val"):
        for suffix in (".bin", ".json"):
            f = root / f"{split}{suffix}"
            if not f.is_file():
                raise ConfigError(
                    f"data.path={d.path}: missing {f} (a relative data.path is looked up in the project "
                    f"directory {PROJECT_DIR}); run `python scripts/prepare_data.py "
                    f"--out {d.path}` or point data.path at a folder with train/val token files"
                )
        try:
            vocab = json.loads((root / f"{split}.json").read_text())["vocab_size"]
        except (ValueError, KeyError) as err:
            raise ConfigError(f"data.path={d.path}: {split}.json is not a token-file sidecar ({err})") from None
        _require(
            vocab <= cfg.model.vocab_size,
            "model.vocab_size",
            cfg.model.vocab_size,
            f"must be >= the data's vocabulary {vocab} ({root / split}.json)",
        )
    check_token_files(cfg)


def validate_launcher(cfg: DictConfig, on_this_machine: bool = True) -> None:
    launch = cfg.launcher
    _one_of("launcher.name", launch.name, LAUNCHERS)
    _positive(launch, "launcher", "nproc_per_node", "nnodes", "stop_timeout_s", "gpu_memory_gb")
    _non_negative(launch, "launcher", "max_restarts")
    _positive(launch, "launcher", "parallel_runs")
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    if on_this_machine:  # `moe-launch plan` describes the target cluster, not this machine
        _require(
            cfg.logging.wandb.mode != "online" or wandb_api_key_available(),
            "logging.wandb.mode",
            "online",
            "no W&B API key found (WANDB_API_KEY, or `wandb login` for ~/.netrc); allowed without a key: offline, "
            "disabled",
        )
    if launch.name == "slurm":
        validate_slurm(cfg)
    if not on_this_machine or launch.name == "slurm":
        return
    _require(
        launch.nnodes == 1, "launcher.nnodes", launch.nnodes, "the local launcher runs on this one node; allowed: 1"
    )
    _one_of("train.device", cfg.train.device, DEVICES)
    _positive(launch, "launcher", "gpu_memory_gb")
    # train.device=cpu runs gloo ranks on the CPU even where GPUs are visible.
    gpus = 0 if cfg.train.device == "cpu" else local_gpu_count()
    _require(
        gpus > 0 or cfg.train.device != "cuda",
        "train.device",
        cfg.train.device,
        "no GPU is visible on this node (nvidia-smi, CUDA_VISIBLE_DEVICES); allowed: auto, cpu",
    )
    limit = gpus if gpus else max(CPU_PROCS_FLOOR, os.cpu_count() or 1)
    what = f"{gpus} GPUs on this node" if gpus else f"at most {limit} CPU processes on this node"
    hint = "; train.device=cpu runs CPU processes" if gpus else ""
    _require(
        launch.nproc_per_node <= limit,
        "launcher.nproc_per_node",
        launch.nproc_per_node,
        f"allowed: 1..{limit} ({what}){hint}",
    )


def wandb_api_key_available() -> bool:
    """What wandb itself would find: WANDB_API_KEY (or an identity token file), or a .netrc
    entry for the W&B host. Checked without importing wandb."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


SLURM_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)$")
SLURM_MEM = re.compile(r"^\d+[KMGT]?$")
SBATCH_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")  # sbatch reads a backslash as an escape; a newline ends the line


def validate_slurm(cfg: DictConfig) -> None:
    """The sbatch options: values go into #SBATCH lines (quoted), so control characters are refused."""
    launch = cfg.launcher
    _non_negative(launch, "launcher", "min_nodes", "gpus_per_node", "cpus_per_task")
    _require(
        launch.min_nodes <= launch.nnodes,
        "launcher.min_nodes",
        launch.min_nodes,
        f"allowed: 0 (not elastic) or 1..launcher.nnodes={launch.nnodes}",
    )
    _require(
        not launch.gpus_per_node or launch.nproc_per_node <= launch.gpus_per_node,
        "launcher.nproc_per_node",
        launch.nproc_per_node,
        f"must be <= launcher.gpus_per_node={launch.gpus_per_node} (one rank per GPU; 0 GPUs for CPU nodes)",
    )
    _require(
        launch.stop_timeout_s < launch.signal_lead_s <= 65535,
        "launcher.signal_lead_s",
        launch.signal_lead_s,
        f"must be > launcher.stop_timeout_s={launch.stop_timeout_s} (the ranks' time to save) and <= 65535",
    )
    _require(
        launch.time == "" or bool(SLURM_TIME.match(launch.time)),
        "launcher.time",
        launch.time,
        "allowed: MINUTES, HH:MM:SS, D-HH, D-HH:MM:SS or UNLIMITED",
    )
    _require(
        launch.mem == "" or bool(SLURM_MEM.match(launch.mem)), "launcher.mem", launch.mem, "allowed: e.g. 0, 4000, 480G"
    )
    values = {f"launcher.{k}": launch[k] for k in ("job_name", "partition", "account", "qos", "constraint")}
    values.update({f"launcher.extra_directives[{i}]": d for i, d in enumerate(launch.extra_directives)})
    values.update({"run_dir": cfg.run_dir, "config": cfg.experiment})
    for key, value in values.items():
        _require(not SBATCH_UNSAFE.search(value), key, repr(value), "must not hold control characters or backslashes")
    for i, directive in enumerate(launch.extra_directives):
        _require(
            directive.startswith("-"),
            f"launcher.extra_directives[{i}]",
            directive,
            "must be an sbatch option such as --mail-type=END",
        )


def validate_checkpoint(cfg: DictConfig) -> None:
    ck = cfg.checkpoint
    _non_negative(ck, "checkpoint", "interval")
    _positive(ck, "checkpoint", "keep")
    _positive(ck, "checkpoint", "write_threads")
    _one_of("train.on_nan", cfg.train.on_nan, ON_NAN)
    if cfg.resume not in RESUME_MODES:
        path = Path(cfg.resume)
        try:
            problem = check_complete(path) if path.is_dir() else "no such directory"
        except OSError as err:
            problem = err.strerror or str(err)
        _require(
            problem is None,
            "resume",
            cfg.resume,
            f"not a checkpoint ({problem}); allowed: {', '.join(RESUME_MODES)}, or the path of a committed "
            "checkpoint directory (RUN_DIR/checkpoints/step-N)",
        )


def validate_elastic(cfg: DictConfig) -> None:
    """An elastic SLURM job may run on any node count from min_nodes up: the layout and batch must fit each."""
    launch = cfg.launcher
    if launch.name != "slurm" or not launch.min_nodes:
        return
    for nodes in range(launch.min_nodes, launch.nnodes):
        shrunk = copy.deepcopy(cfg)
        shrunk.launcher.nnodes = nodes
        try:
            validate_train(shrunk, validate_layout(shrunk))
        except ConfigError as err:
            raise ConfigError(f"{err} (on {nodes} nodes, which launcher.min_nodes={launch.min_nodes} allows)") from None


def validate_finite(cfg: DictConfig, prefix: str = "") -> None:
    """inf and nan pass every `> 0` check; no float in the schema may be either."""
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            if full != "extra":
                validate_finite(value, f"{full}.")
        elif isinstance(value, float):
            _require(math.isfinite(value), full, value, "must be a finite number")


def validate(cfg: DictConfig, on_this_machine: bool = True) -> Layout:
    """Every check, in the order a user would fix them; returns the resolved layout.
    on_this_machine=False skips what only matters for starting here (GPUs visible, one node)."""
    validate_finite(cfg)
    validate_launcher(cfg, on_this_machine)
    validate_model(cfg.model)
    layout = validate_layout(cfg)
    validate_train(cfg, layout)
    validate_elastic(cfg)
    validate_pipeline(cfg, layout)
    if on_this_machine:  # the data lives where the job runs; `plan` may describe another cluster
        validate_data(cfg)
    validate_checkpoint(cfg)
    return layout
