"""Runs the real Trainer on N gloo processes spawned in-test, and collects its numbers."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from framework.config import Config
from scripts.benchlib import run_ranks

# A model small enough for 8 processes on 2 cores, with every feature switched on:
# dense + MoE blocks, shared experts, group-limited routing, aux loss, MTP, GQA.
PARITY_MODEL = [
    "model.dim=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=64",
    "model.seq_len=16", "model.ffn_dim=48", "model.num_experts=8", "model.num_shared_experts=1",
    "model.top_k=2", "model.expert_dim=16", "model.first_k_dense=1", "model.n_groups=2",
    "model.topk_groups=1", "model.aux_loss_alpha=0.01", "model.mtp_depth=1", "model.bias_update_speed=0.01",
    "train.global_batch_size=8", "train.micro_batch_size=1", "optim.lr=3e-3", "optim.warmup_steps=0",
    "data.source=synthetic", "data.synthetic_tokens=20000", "logging.wandb.mode=disabled", "train.device=cpu",
]  # fmt: skip


def make_config(run_dir: Path, world: int, overrides: list[str]):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(PARITY_MODEL + overrides))
    cfg.launcher.nproc_per_node = world
    cfg.run_dir = str(run_dir)
    return cfg


def _train(rank: int, world: int, cfg_yaml: str, steps: int) -> dict:
    from framework.distributed import DistContext
    from framework.train import Trainer
    from parallel.full_state import full_state_dict

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    losses, loads = [], []
    for _ in range(steps):
        loss, _ = trainer.train_step()
        trainer.step += 1
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        loads.append(trainer.last_loads.clone())
    state = full_state_dict(trainer.model)
    biases = torch.stack([m.router.expert_bias for m in trainer.model.moe_layers()])
    all_biases = [torch.empty_like(biases) for _ in range(world)]
    dist.all_gather(all_biases, biases)
    memory = [None] * world
    dist.all_gather_object(memory, trainer.peak_memory)
    return {"losses": losses, "loads": loads, "state": state, "biases": all_biases, "memory": memory}


def run_layout(tmp_path: Path, world: int, overrides: list[str], steps: int = 5) -> dict:
    """Train `steps` steps on `world` processes; -> losses, loads, full weights, biases."""
    cfg = make_config(tmp_path / "run", world, overrides)
    return run_ranks(_train, world, OmegaConf.to_yaml(cfg), steps)[0]


def _train_segment(rank: int, world: int, cfg_yaml: str, stop_at: int, save_at: tuple[int, ...]) -> dict:
    """Resume from the run dir if a checkpoint is there, train to `stop_at` (saving after the
    steps in `save_at` and training on while an async save writes), save. After each step one
    draw from the global torch RNG (as dropout would take) shows whether its state was resumed."""
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    start = trainer.step
    losses, draws = {}, {}
    while trainer.step < stop_at:
        loss, _ = trainer.train_step()
        trainer.step += 1
        dist.all_reduce(loss)
        losses[trainer.step] = loss.item() / world
        draws[trainer.step] = torch.rand(()).item()
        if trainer.step in save_at:
            trainer.save()
    trainer.save()
    trainer.checkpoints.close()
    return {"start": start, "losses": losses, "draws": draws}


def train_segment(run_dir: Path, world: int, overrides: list[str], stop_at: int, save_at: tuple[int, ...] = ()) -> dict:
    """One launch of the real Trainer on `world` ranks over a shared run dir (resumes)."""
    cfg = make_config(run_dir, world, overrides)
    return run_ranks(_train_segment, world, OmegaConf.to_yaml(cfg), stop_at, save_at)[0]


def expert_parallel_moe(world: int, ep_per_node: int, **model_args) -> tuple[torch.nn.Module, dict]:
    """One MoE layer, built the same on every rank (seed 0, weights N(0, 0.5)), then expert-parallel
    over `world` ranks; -> (the layer, its full expert weights from before the split)."""
    from framework.model.args import ModelArgs
    from framework.model.moe.layer import MoE
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.layout import resolve_layout
    from parallel.mesh import build_expert_mesh

    class Holder(torch.nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.moe = moe

        def moe_layers(self):
            return [self.moe]

    torch.manual_seed(0)  # the same full layer on every rank, as after init_weights
    moe = MoE(ModelArgs(**model_args))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    mesh = build_expert_mesh(resolve_layout(world, 1, "auto", -1, world), torch.device("cpu"))
    full_experts = {n: p.detach().clone() for n, p in moe.experts.named_parameters()}
    apply_expert_parallel(Holder(moe), mesh, ep_per_node)
    return moe, full_experts


def graph_nodes(roots) -> list:
    """Every autograd node reachable from `roots` (None entries allowed), each once."""
    seen, stack = {}, list(roots)
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen[node] = None
            stack.extend(child for child, _ in node.next_functions)
    return list(seen)


def saved_storages(nodes, skip: set[int] = frozenset()) -> dict[int, int]:
    """Storage -> bytes of the distinct storages `nodes` hold for their backward: the built-in
    nodes' `_saved_*` and custom Functions' `saved_tensors` (the grouped GEMM's); a released one
    (unpacking raises) holds nothing, 0-dim ones (Python scalars') and storages in `skip` (the
    parameters') are left out."""
    held = {}
    for node in nodes:
        names = [a for a in dir(node) if a.startswith("_saved_")] + ["saved_tensors"] * hasattr(node, "saved_tensors")
        for attribute in names:
            try:
                saved = getattr(node, attribute)
            except RuntimeError:
                continue
            for t in saved if isinstance(saved, (list, tuple)) else (saved,):
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.untyped_storage().data_ptr() not in skip:
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return held
