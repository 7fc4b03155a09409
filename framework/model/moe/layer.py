"""The MoE FFN: route, dispatch, run the experts, combine, add the shared experts."""

from __future__ import annotations

import torch
from torch import nn

from framework.model.ffn import SwiGLU
from framework.model.moe.experts import GroupedExperts
from framework.model.moe.router import Router, sequence_aux_loss
from parallel.token_dispatch import LocalDispatcher, TokenDispatcher, count_per_expert


class MoE(nn.Module):
    def __init__(
        self,
        dim: int,
        num_experts: int,
        expert_dim: int,
        top_k: int,
        num_shared_experts: int = 1,
        n_groups: int = 1,
        topk_groups: int = 1,
        score_func: str = "sigmoid",
        route_scale: float = 1.0,
        aux_loss_alpha: float = 0.0,
    ):
        super().__init__()
        self.num_experts, self.aux_loss_alpha = num_experts, aux_loss_alpha
        self.router = Router(dim, num_experts, top_k, n_groups, topk_groups, score_func, route_scale)
        self.experts = GroupedExperts(num_experts, dim, expert_dim)
        self.shared = SwiGLU(dim, num_shared_experts * expert_dim) if num_shared_experts else None
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        # Tokens routed to each expert since the last bias update (all experts, this rank's data).
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts), persistent=False)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> output, sequence-wise auxiliary loss (zero when alpha is 0 or not training)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD)
        if self.training:  # evaluation must not move the load-balancing bias
            with torch.no_grad():
                self.tokens_per_expert += count_per_expert(routing.topk_idx_TK.reshape(-1), self.num_experts).to(
                    self.tokens_per_expert
                )
        x_ND, tokens_per_expert, meta = self.dispatcher.dispatch(x_TD, routing.topk_idx_TK, self.num_experts)
        y_ND = self.experts(x_ND, tokens_per_expert)
        out_TD = self.dispatcher.combine(y_ND, meta, routing.topk_weights_TK)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD).to(out_TD.dtype)
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_loss_alpha > 0:
            aux = sequence_aux_loss(routing, B, self.aux_loss_alpha)
        return out_TD.view(B, S, D).to(x_BSD.dtype), aux
