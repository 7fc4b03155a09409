"""The MoE FFN: route, dispatch, run the experts, combine, add the shared experts."""

from __future__ import annotations

import torch
from torch import nn

from framework.model.args import ModelArgs
from framework.model.ffn import SwiGLU
from framework.model.moe.aux_loss import attach_aux_loss
from framework.model.moe.experts import GroupedExperts
from framework.model.moe.router import Router, sequence_aux_loss
from parallel.activation_checkpoint import is_recomputing
from parallel.token_dispatch import LocalDispatcher, TokenDispatcher, count_per_expert


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts, self.aux_loss_alpha = args.num_experts, args.aux_loss_alpha
        self.router = Router(args)
        self.experts = GroupedExperts(args.num_experts, args.dim, args.expert_dim)
        shared_dim = args.num_shared_experts * args.expert_dim
        self.shared = SwiGLU(args.dim, shared_dim) if args.num_shared_experts else None
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        # Tokens routed to each expert since the last bias update (all experts, this rank's data).
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts), persistent=False)
        self.last_aux_loss = torch.zeros(())  # detached, for inspection

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """-> output. While training with aux_loss_alpha > 0, the sequence-wise auxiliary loss
        is attached to the output's backward (aux_loss.py) and kept in `last_aux_loss`. A rerun under
        activation checkpointing attaches it again only to the discarded recomputed graph."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.router(x_TD)
        # Evaluation must not move the load-balancing bias; a checkpointed block's rerun in the
        # backward must not count its tokens twice.
        if self.training and not is_recomputing():
            with torch.no_grad():
                self.tokens_per_expert += count_per_expert(routing.topk_idx_TK.reshape(-1), self.num_experts).to(
                    self.tokens_per_expert
                )
        x_MD, tokens_per_expert_L, meta = self.dispatcher.dispatch(x_TD, routing.topk_idx_TK, self.num_experts)
        y_MD = self.experts(x_MD, tokens_per_expert_L)
        out_TD = self.dispatcher.combine(y_MD, meta, routing.topk_weights_TK)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD).to(out_TD.dtype)
        out_BSD = out_TD.view(B, S, D).to(x_BSD.dtype)
        if self.training and self.aux_loss_alpha > 0:
            aux = sequence_aux_loss(routing, B, self.aux_loss_alpha)
            if not is_recomputing():
                self.last_aux_loss = aux.detach()
            out_BSD = attach_aux_loss(out_BSD, aux)
        return out_BSD
