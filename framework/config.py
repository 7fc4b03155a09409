"""The config schema: the one contract between the launcher and every rank.

Strict OmegaConf structured configs: unknown keys and wrong types fail at composition.
Imports no torch, so the launcher can load it without touching tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.model.args import ModelArgs


@dataclass
class ParallelConfig:
    """Sizes of the device mesh: W = pp x dp_replicate x dp_shard; ep borrows from dp."""

    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 2  # stages per pipeline rank for interleaved_1f1b (>= 2); other schedules ignore it
    # dualpipe/dualpipev with ep > 1: each F&B runs its forward and backward interleaved at the
    # expert all-to-alls, so one's all-to-all is in flight while the other computes; false: F then B
    pp_overlap: bool = True
    dp_replicate: Any = "auto"  # an int >= 1, or "auto": whatever the world size leaves
    dp_shard: int = -1  # -1: every data-parallel rank not taken by an explicit dp_replicate
    ep: int = 1
    ep_per_node: int = 0  # EP ranks per node, for node-limited routing; 0: launcher.nproc_per_node


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a cosine (or linear, or constant) decay."""

    name: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine | linear | constant
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    """The loop: global batch in sequences, the same on every layout."""

    steps: int = 100
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto: CUDA + NCCL where a GPU is visible, else CPU + gloo | cpu | cuda
    compile: bool = False  # torch.compile each transformer block (and MTP module)
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    on_nan: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    collective_timeout_s: int = 600  # a collective stuck this long (a peer died) fails the rank, so torchrun restarts
    activation_checkpointing: str = "none"  # none | full | selective


@dataclass
class DataConfig:
    """Where tokens come from: a token file pair (train/val) or a synthetic stream."""

    source: str = "file"  # file | synthetic
    path: str = "data/stdlib"  # folder holding train.bin/.json and val.bin/.json
    synthetic_tokens: int = 1_000_000


@dataclass
class LauncherConfig:
    """How processes start: torchrun on this machine (local) or in a SLURM job (slurm)."""

    name: str = "local"
    nproc_per_node: int = 2
    nnodes: int = 1
    max_restarts: int = 0
    # After SIGTERM/SIGUSR1 the ranks finish the step and save; torchrun kills them after this
    # many seconds (its own default is 30, short for a big model's save). Keep it below the
    # lead time of SLURM's --signal.
    stop_timeout_s: int = 120
    gpu_memory_gb: float = 80  # memory of one GPU, what `moe-launch plan` checks a layout against
    # Sweeps (-m): local points run this many at a time; on SLURM each point is its own job.
    parallel_runs: int = 1
    # SLURM (launcher=slurm): one sbatch job of nnodes nodes; an empty or zero value leaves its
    # #SBATCH line out. min_nodes > 0 makes the job elastic (torchrun --nnodes=min_nodes:nnodes).
    min_nodes: int = 0
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""  # the job's time limit, e.g. 04:00:00 or 2-00:00:00
    constraint: str = ""
    exclusive: bool = False
    mem: str = ""  # per node, e.g. 480G; 0 asks for all of it
    job_name: str = ""  # empty: the experiment name
    gpus_per_node: int = 0
    cpus_per_task: int = 0  # CPUs for the one task per node that runs torchrun and all its ranks
    # SLURM signals the job this many seconds before its time limit; the ranks save and it requeues.
    signal_lead_s: int = 300
    extra_directives: list[str] = field(default_factory=list)  # more sbatch options, e.g. --mail-type=END


class CheckpointConfig:
    """Checkpoint cadence and retention (the public key `async` is a Python keyword)."""

    interval: int = 0  # steps between saves; 0 saves only at the end (and on SIGTERM/SIGUSR1)
    keep: int = 3  # newest committed checkpoints kept
    write_threads: int = 2  # writer threads per rank (one shard file each); DCP's default is 1


# `checkpoint.async` is the public key users type, so the field is added by name.
CheckpointConfig.__annotations__["async"] = bool
setattr(CheckpointConfig, "async", False)
CheckpointConfig = dataclass(init=False, repr=False, eq=False)(CheckpointConfig)


@dataclass
class WandbConfig:
    mode: str = "offline"  # disabled | offline | online
    project: str = "moe-launch"


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    """The whole run. `extra` is the one free-form namespace (`+extra.note=...`)."""

    experiment: str = "default"
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = ""
    resume: str = "auto"  # auto: newest usable checkpoint in run_dir | never | PATH
    extra: dict[str, Any] = field(default_factory=dict)


RESOLVED_CONFIG_NAME = "config.yaml"


def load_run_config(path: str | Path) -> DictConfig:
    """Read the resolved YAML a launcher wrote, checked against the schema again."""
    schema = OmegaConf.structured(Config)
    cfg = OmegaConf.merge(schema, OmegaConf.load(path))
    OmegaConf.set_readonly(cfg, True)
    return cfg
