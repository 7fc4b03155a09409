"""Token dispatch and combine: move each (token, slot) to its expert and back.

One small interface so the MoE layer never asks which one it has: this local version
(every expert on this rank) and the all-to-all one in expert_parallel.py. Dispatchers
live in parallel/ because they are the only part of the MoE that talks to other ranks.
Shape suffixes (N, M, L, ...) are the letters defined in framework/model/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class DispatchMeta:
    """What combine() needs to undo dispatch()."""

    order_N: torch.Tensor  # flat (token, slot) index of each dispatched row, sorted by expert
    num_tokens: int
    top_k: int


class TokenDispatcher(Protocol):
    cross_node_rows: int  # routed rows sent to another node since the counter was reset

    def dispatch(
        self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        """-> x_MD: the rows this rank's experts compute, grouped by local expert;
        tokens_per_expert_L: rows per local expert; metadata for combine."""
        ...

    def combine(self, y_MD: torch.Tensor, meta: DispatchMeta, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        """-> out_TD: per-token sum over slots of gate weight x expert output."""
        ...


class LocalDispatcher:
    """All experts live on this rank: a stable sort by expert id is the whole dispatch.
    The rows never leave, so M = N and the local experts are all experts (L = E)."""

    cross_node_rows = 0  # nothing leaves this rank

    def dispatch(self, x_TD, topk_idx_TK, num_experts):
        T, K = topk_idx_TK.shape
        expert_N = topk_idx_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        x_ND = x_TD.index_select(0, order_N // K)  # its backward is a cheap index_add
        tokens_per_expert_E = count_per_expert(expert_N, num_experts)
        return x_ND, tokens_per_expert_E, DispatchMeta(order_N, T, K)

    def combine(self, y_MD, meta, topk_weights_TK):
        return weighted_sum_to_tokens(y_MD, meta, topk_weights_TK)


def count_per_expert(expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert, like bincount(minlength=num_experts) but without its host sync
    (CUDA's bincount reads the max and min back to size its output)."""
    ones_N = torch.ones_like(expert_N)
    return torch.zeros(num_experts, dtype=expert_N.dtype, device=expert_N.device).scatter_add_(0, expert_N, ones_N)


def weighted_sum_to_tokens(y_ND: torch.Tensor, meta: DispatchMeta, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Scale each row (back in dispatch order, N = T x K) by its gate weight and add it
    into its token's output, in fp32.
    One pass over the rows, no inverse permutation and no [T, K, D] intermediate."""
    token_N = meta.order_N // meta.top_k
    gate_N = topk_weights_TK.reshape(-1).index_select(0, meta.order_N)
    rows_ND = y_ND.float() * gate_N.unsqueeze(-1)
    out_TD = rows_ND.new_zeros(meta.num_tokens, y_ND.shape[-1]).index_add(0, token_N, rows_ND)
    return out_TD.to(y_ND.dtype)
