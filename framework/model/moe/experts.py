"""The routed experts: E SwiGLU FFNs stored as 3-D weights and run as one grouped GEMM.

Dropless: every token a router sends is computed, whatever the imbalance (no capacity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from framework.model.moe.grouped_gemm import grouped_mm


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x_MD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        """x rows are grouped by expert, tokens_per_expert_L[e] rows for expert e."""
        # Under expert parallelism the weights are DTensors sharded over EP ranks; the
        # rows that reach this rank are for the local experts only.
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3))
        device = x_MD.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x_MD, w1, w2, w3 = (t.to(dtype) for t in (x_MD, w1, w2, w3))
        else:
            x_MD = x_MD.to(w1.dtype)
        offsets_L = torch.cumsum(tokens_per_expert_L, 0)
        h_MF = F.silu(grouped_mm(x_MD, w1, offsets_L)) * grouped_mm(x_MD, w3, offsets_L)
        return grouped_mm(h_MF, w2, offsets_L)
