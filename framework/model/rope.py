"""Rotary position embeddings: a fixed cos/sin table, applied to query and key heads."""

import torch


def rope_table(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_len, head_dim/2], in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHSd: torch.Tensor, cos_Sh: torch.Tensor, sin_Sh: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of the head dimension by its position's angle."""
    seq = x_BHSd.shape[2]
    cos, sin = cos_Sh[:seq], sin_Sh[:seq]
    x = x_BHSd.float()
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2).to(x_BHSd.dtype)
