"""Model FLOPs per token (from the config) and the device's measured peak, for MFU."""

from __future__ import annotations

import time

import torch


def active_matmul_params(m) -> int:
    """Weights one token multiplies through: attention, dense or active-expert FFNs, head."""
    head_dim = m.dim // m.n_heads
    attn = m.dim * head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    dense_ffn = 3 * m.dim * m.ffn_dim
    moe_ffn = 3 * m.dim * m.expert_dim * (m.top_k + m.num_shared_experts) + m.dim * m.num_experts
    moe_layers = m.n_layers - m.first_k_dense
    per_mtp = attn + (moe_ffn if moe_layers else dense_ffn) + 2 * m.dim * m.dim
    trunk = m.n_layers * attn + m.first_k_dense * dense_ffn + moe_layers * moe_ffn
    heads = (1 + m.mtp_depth) * m.dim * m.vocab_size
    return trunk + m.mtp_depth * per_mtp + heads


def train_flops_per_token(m) -> float:
    """6N for the matmuls (forward + backward) plus causal attention's 6 * L * S * dim."""
    layers = m.n_layers + m.mtp_depth
    return 6.0 * active_matmul_params(m) + 6.0 * layers * m.seq_len * m.dim


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Best sustained FLOP/s of one large matmul: the measured peak that MFU divides by."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    for i in range(100):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
        if i >= 2 and time.perf_counter() > deadline:
            break
    return best
