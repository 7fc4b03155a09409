"""Model FLOPs per token (from the config) and the device's measured peak, for MFU."""

from __future__ import annotations

import functools
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


# The matmul MFU divides by: 8192^3 on a GPU (what a GPU's peak is quoted and measured at),
# 1024^3 on CPU, where an 8192^3 product takes many seconds per rank (a CPU's mfu is a
# rough guide only).
PEAK_MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}


@functools.cache
def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Sustained FLOP/s of one n^3 matmul in the compute dtype (n from PEAK_MATMUL_SIZE):
    the mean over timed runs after warm-up, measured once per device and dtype."""
    n = PEAK_MATMUL_SIZE.get(device.type, PEAK_MATMUL_SIZE["cpu"])
    warmup, timed = (3, 10) if device.type == "cuda" else (1, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(timed):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        begin = time.perf_counter()
        for _ in range(timed):
            a @ b
        seconds = time.perf_counter() - begin
    return 2 * n**3 * timed / seconds
