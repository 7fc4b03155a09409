"""Builds this rank's share of the model: on the meta device first, then experts kept,
sharded, and only this rank's shards materialised and initialised.

No rank ever holds the whole model, so DeepSeek-V3-size models start; the values equal a
full single-process init's (framework/model/init_blocks.py), whatever the layout.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from framework.model.args import ModelArgs
from framework.model.transformer import MoETransformer
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import apply_compile
from parallel.expert_parallel import apply_expert_parallel
from parallel.fsdp import apply_fsdp
from parallel.mesh import dp_mesh, expert_dp_mesh
from parallel.pipeline.stage import keep_pieces as keep_stage_pieces


def build_sharded_model(
    args: ModelArgs,
    seed: int,
    mesh: DeviceMesh,
    expert_mesh: DeviceMesh,
    precision: str,
    device: torch.device,
    ep_per_node: int,
    keep_pieces: frozenset[str] | None = None,
    compile_blocks: bool = False,
    activation_checkpointing: str = "none",
) -> tuple[MoETransformer, int]:
    """-> (the sharded, initialised model, the whole model's parameter count). With
    `keep_pieces` (pipeline parallelism) only this rank's stages stay, names unchanged;
    `activation_checkpointing` (none | full | selective) applies to every block, MTP's included."""
    with torch.device("meta"):
        model = MoETransformer(args)
    n_params = sum(p.numel() for p in model.parameters())  # before EP splits experts
    if keep_pieces is not None:
        keep_stage_pieces(model, keep_pieces)
    apply_activation_checkpointing([*model.layers.values(), *(m.block for m in model.mtp)], activation_checkpointing)
    apply_expert_parallel(model, expert_mesh, ep_per_node)
    if compile_blocks:  # train.compile: each block's forward, names and FSDP hooks unchanged
        apply_compile(model)
    apply_fsdp(model, dp_mesh(mesh), expert_dp_mesh(expert_mesh), precision)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model, n_params
