"""Grouped GEMM: one matmul per expert over its contiguous block of sorted tokens.

Uses `torch._grouped_mm` (one kernel for all experts) where it runs for the device and
dtype, else a per-expert loop that computes the same thing. The backward is written out
because `_grouped_mm`'s own backward rejects the expanded (stride-0) gradients that
reductions such as `.sum()` produce.
"""

from __future__ import annotations

import torch

from parallel.compat import grouped_mm_supported
from parallel.pipeline.backward_split import input_gradient_wanted, weight_gradient_wanted

__all__ = ["grouped_mm", "grouped_mm_supported", "looped_mm"]


def looped_mm(x_MI: torch.Tensor, w_LIO: torch.Tensor, offsets_L: torch.Tensor) -> torch.Tensor:
    """Reference: rows [offsets[e-1], offsets[e]) of x times w[e], one matmul per expert.
    split/unbind (not slicing) so the backward concatenates instead of allocating a
    full-size zero gradient per expert."""
    counts = torch.diff(offsets_L, prepend=offsets_L.new_zeros(1)).tolist()
    outs = [x @ w for x, w in zip(x_MI.split(counts), w_LIO.unbind(0), strict=True)]
    return torch.cat(outs) if outs else x_MI.new_zeros(0, w_LIO.shape[-1])


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MI, w_LIO, offsets_L):
        ctx.save_for_backward(x_MI, w_LIO, offsets_L)
        return torch._grouped_mm(x_MI, w_LIO, offs=offsets_L)

    @staticmethod
    def backward(ctx, grad_MO):
        x_MI, w_LIO, offsets_L = ctx.saved_tensors
        grad_MO = grad_MO.contiguous()
        grad_x = grad_w = None
        # A pipeline's split backward asks for the two in separate passes (B, then W).
        if ctx.needs_input_grad[0] and input_gradient_wanted():
            grad_x = torch._grouped_mm(grad_MO, w_LIO.transpose(-2, -1), offs=offsets_L)
        if ctx.needs_input_grad[1] and weight_gradient_wanted():
            # (I x M) @ (M x O) split along M by the offsets -> one I x O block per expert.
            grad_w = torch._grouped_mm(x_MI.t(), grad_MO, offs=offsets_L)
        return grad_x, grad_w, None


def _aligned(x_MI: torch.Tensor, w_LIO: torch.Tensor) -> bool:
    """`_grouped_mm` needs every row stride to be a multiple of 16 bytes."""
    size = x_MI.element_size()
    return all(n * size % 16 == 0 for n in (x_MI.shape[-1], w_LIO.shape[-1], w_LIO.shape[-2]))


# Eager even inside a torch.compile'd block: the probe must really run, and torch 2.13's
# tracing kernel for `_grouped_mm` accepts only bf16 while its CPU kernel also runs fp32.
@torch.compiler.disable
def grouped_mm(x_MI: torch.Tensor, w_LIO: torch.Tensor, offsets_L: torch.Tensor) -> torch.Tensor:
    """x (tokens sorted by expert) @ w[expert of each row]; offsets are cumulative row ends."""
    if x_MI.dtype == w_LIO.dtype and grouped_mm_supported(x_MI.device.type, x_MI.dtype) and _aligned(x_MI, w_LIO):
        return _GroupedMM.apply(x_MI, w_LIO, offsets_L.to(torch.int32))
    return looped_mm(x_MI, w_LIO, offsets_L)
