"""Runs the real Trainer on N gloo processes spawned in-test, and collects its numbers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from framework.config import Config

# A model small enough for 8 processes on 2 cores, with every feature switched on:
# dense + MoE blocks, shared experts, group-limited routing, aux loss, MTP, GQA.
PARITY_MODEL = [
    "model.dim=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=64",
    "model.seq_len=16", "model.ffn_dim=48", "model.num_experts=8", "model.num_shared_experts=1",
    "model.top_k=2", "model.expert_dim=16", "model.first_k_dense=1", "model.n_groups=2",
    "model.topk_groups=1", "model.aux_loss_alpha=0.01", "model.mtp_depth=1", "model.bias_update_speed=0.01",
    "train.global_batch_size=8", "train.micro_batch_size=1", "optim.lr=3e-3", "optim.warmup_steps=0",
    "data.source=synthetic", "data.synthetic_tokens=20000", "logging.wandb.mode=disabled",
]  # fmt: skip


def make_config(run_dir: Path, world: int, overrides: list[str]):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(PARITY_MODEL + overrides))
    cfg.launcher.nproc_per_node = world
    cfg.run_dir = str(run_dir)
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_yaml: str, steps: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from framework.distributed import init_distributed
    from framework.train import Trainer
    from parallel.full_state import full_state_dict

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    ctx = init_distributed()
    trainer = Trainer(cfg, ctx)
    losses, loads = [], []
    for _ in range(steps):
        loss, _ = trainer.train_step()
        trainer.step += 1
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        loads.append(trainer.last_loads.clone())
    ep_group = trainer.expert_mesh["ep"].get_group()
    state = full_state_dict(trainer.model, ep_group)
    biases = torch.stack([m.router.expert_bias for m in trainer.model.moe_layers()])
    all_biases = [torch.empty_like(biases) for _ in range(world)]
    dist.all_gather(all_biases, biases)
    memory = [None] * world
    dist.all_gather_object(memory, trainer.peak_memory)
    if rank == 0:
        result = {"losses": losses, "loads": loads, "state": state, "biases": all_biases, "memory": memory}
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see framework.distributed.shutdown: gloo threads can abort at exit


def run_layout(tmp_path: Path, world: int, overrides: list[str], steps: int = 5) -> dict:
    """Train `steps` steps on `world` processes; -> losses, loads, full weights, biases."""
    run_dir = tmp_path / f"w{world}-{'-'.join(o.replace('parallel.', '') for o in overrides) or 'ref'}"
    cfg = make_config(run_dir, world, overrides)
    out = str(run_dir / "result.pt")
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, OmegaConf.to_yaml(cfg), steps, out)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"workers exited with {codes}"
    return torch.load(out, weights_only=True)
