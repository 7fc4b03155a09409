"""Top-k routing with group limits and auxiliary-loss-free load balancing (DeepSeek-V3).

A per-expert bias is added to the affinities for choosing experts only; the gate weights
use the unbiased affinities. The bias moves against the observed load after each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from framework.model.args import SCORE_FUNCS, ModelArgs
from parallel.compat import register_pytree_dataclass


@register_pytree_dataclass  # FSDP2 must see these tensors to re-gather the router's weight for backward
@dataclass(frozen=True)
class Routing:
    topk_idx_TK: torch.Tensor  # chosen expert per token and slot
    topk_weights_TK: torch.Tensor  # gate weight per token and slot (fp32)
    scores_TE: torch.Tensor  # unbiased affinities, for the sequence-wise aux loss


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={args.score_func!r}: allowed: {', '.join(SCORE_FUNCS)}")
        self.num_experts, self.top_k = args.num_experts, args.top_k
        self.n_groups, self.topk_groups = args.n_groups, args.topk_groups
        self.score_func, self.route_scale = args.score_func, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.dim))
        # Persistent: the bias is training state and must survive a checkpoint.
        self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))

    def _group_mask(self, biased_TE: torch.Tensor) -> torch.Tensor:
        """Keep only each token's `topk_groups` best groups, ranked by their top-2 affinities."""
        T = biased_TE.shape[0]
        per_group = biased_TE.view(T, self.n_groups, -1)
        best = min(2, per_group.shape[-1])
        group_scores_TG = per_group.topk(best, dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_scores_TG.topk(self.topk_groups, dim=-1).indices, True)
        return keep_TG.repeat_interleave(self.num_experts // self.n_groups, dim=1)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        # The router runs in fp32 even under bf16 autocast: small errors flip top-k choices.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid() if self.score_func == "sigmoid" else logits_TE.softmax(dim=-1)
        biased_TE = scores_TE.detach() + self.expert_bias
        if self.n_groups > 1 and self.topk_groups < self.n_groups:
            biased_TE = biased_TE.masked_fill(~self._group_mask(biased_TE), float("-inf"))
        topk_idx_TK = biased_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, topk_idx_TK)
        if self.score_func == "sigmoid":
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return Routing(topk_idx_TK, weights_TK * self.route_scale, scores_TE)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, speed: float) -> None:
        """bias_e += speed * sign(mean load - load_e): overloaded experts get picked less."""
        load_E = load_E.to(self.expert_bias)
        self.expert_bias += speed * torch.sign(load_E.mean() - load_E)


def sequence_aux_loss(routing: Routing, batch: int, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: alpha * sum_e f_e * P_e, mean over sequences."""
    T, E = routing.scores_TE.shape
    K = routing.topk_idx_TK.shape[1]
    seq = T // batch
    chosen_TE = torch.zeros(T, E, device=routing.scores_TE.device)
    chosen_TE.scatter_(1, routing.topk_idx_TK, 1.0)
    chosen_BSE = chosen_TE.view(batch, seq, E)
    f_BE = chosen_BSE.sum(1) * (E / (K * seq))
    probs_TE = routing.scores_TE / routing.scores_TE.sum(-1, keepdim=True)
    p_BE = probs_TE.view(batch, seq, E).mean(1)
    return alpha * (f_BE * p_BE).sum(-1).mean()
