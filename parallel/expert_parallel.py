"""Expert parallelism: each EP rank keeps num_experts/ep whole experts; tokens travel.

`AllToAllDispatcher` has the same dispatch()/combine() as the local one: exchange
per-expert counts, permute tokens by destination, one variable-size all-to-all (autograd
flows through it; parallel/all_to_all.py, which also hands over to the other side of an
overlapped F&B while it is in flight), regroup by local expert; combine runs the same steps
backwards.
`apply_expert_parallel` swaps it into every MoE layer and turns each expert weight into
a DTensor sharded over the EP ranks: each rank holds its experts, while the weight keeps
its global shape, so checkpoints and full_tensor() see the whole expert stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from parallel.activation_checkpoint import is_recomputing
from parallel.all_to_all import all_to_all, exchange
from parallel.token_dispatch import DispatchMeta, count_per_expert, weighted_sum_to_tokens


@dataclass(frozen=True)
class AllToAllMeta(DispatchMeta):
    send_splits: list[int]  # rows this rank sends to each EP rank
    recv_splits: list[int]  # rows this rank receives from each EP rank
    regroup_M: torch.Tensor  # received row order -> grouped by local expert


class AllToAllDispatcher:
    def __init__(self, ep_group: dist.ProcessGroup, ep_rank: int, ep_size: int, ep_per_node: int):
        self.group, self.ep_rank, self.ep_size = ep_group, ep_rank, ep_size
        self.ep_per_node = ep_per_node
        # Routed (token, slot) rows sent to an EP rank on another node, since last read.
        self.cross_node_rows = 0

    def dispatch(self, x_TD, topk_idx_TK, num_experts):
        T, K = topk_idx_TK.shape
        local = num_experts // self.ep_size
        expert_N = topk_idx_TK.reshape(-1)
        # Experts are laid out rank by rank, so sorting by expert also sorts by destination.
        order_N = torch.argsort(expert_N, stable=True)
        x_ND = x_TD.index_select(0, order_N // K)
        counts_E = count_per_expert(expert_N, num_experts)
        # recv_counts[s, j]: rows source rank s sends to my local expert j.
        recv_counts = exchange(counts_E, [local] * self.ep_size, [local] * self.ep_size, self.group)  # [R x L], flat
        counts_RL, recv_RL = counts_E.view(self.ep_size, local), recv_counts.view(self.ep_size, local)
        # Host sync, kept: all_to_all_single needs the split sizes on the host. One read for both.
        send_splits, recv_splits = torch.stack([counts_RL.sum(1), recv_RL.sum(1)]).tolist()
        if not is_recomputing():  # activation checkpointing reruns this in the backward
            self._count_cross_node(send_splits)

        x_MD = all_to_all(x_ND, recv_splits, send_splits, self.group)
        # Received rows come as (source rank, local expert) blocks; the grouped GEMM wants
        # them as (local expert, source rank).
        blocks = torch.arange(self.ep_size * local, device=x_MD.device)
        block_M = torch.repeat_interleave(blocks, recv_RL.reshape(-1), output_size=sum(recv_splits))
        source, expert = block_M // local, block_M % local
        regroup_M = torch.argsort(expert * self.ep_size + source, stable=True)
        meta = AllToAllMeta(order_N, T, K, send_splits, recv_splits, regroup_M)
        return x_MD.index_select(0, regroup_M), recv_RL.sum(0), meta

    def combine(self, y_MD, meta, topk_weights_TK):
        inverse_M = torch.empty_like(meta.regroup_M)
        inverse_M[meta.regroup_M] = torch.arange(meta.regroup_M.numel(), device=meta.regroup_M.device)
        y_ND = all_to_all(y_MD.index_select(0, inverse_M), meta.send_splits, meta.recv_splits, self.group)
        return weighted_sum_to_tokens(y_ND, meta, topk_weights_TK)

    def _count_cross_node(self, send_splits: list[int]) -> None:
        my_node = self.ep_rank // self.ep_per_node
        self.cross_node_rows += sum(n for r, n in enumerate(send_splits) if r // self.ep_per_node != my_node)


def _shard_experts(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Keep this rank's slice of each [E, ...] weight as a DTensor Shard(0) on the EP mesh.
    Every rank built the same full weights (or none yet, on the meta device), so no data moves."""
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        local = full.detach().chunk(ep_size, dim=0)[ep_rank].clone()
        sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
        setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))


def apply_expert_parallel(model: nn.Module, expert_mesh: DeviceMesh, ep_per_node: int) -> None:
    """Run after weights are initialised (identically on every rank), before FSDP.
    `model.moe_layers()` yields modules with `.experts` (3-D w1/w2/w3) and `.dispatcher`."""
    ep_mesh = expert_mesh["ep"]
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    if ep_size == 1:
        return
    group = ep_mesh.get_group()
    for moe in model.moe_layers():
        _shard_experts(moe.experts, ep_mesh)
        moe.dispatcher = AllToAllDispatcher(group, ep_rank, ep_size, ep_per_node)
