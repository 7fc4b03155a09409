"""Grouped GEMM: one matmul per expert over its contiguous block of sorted tokens.

Uses `torch._grouped_mm` (one kernel for all experts) where it runs for the device and
dtype, else a per-expert loop that computes the same thing. The backward is written out
because `_grouped_mm`'s own backward rejects the expanded (stride-0) gradients that
reductions such as `.sum()` produce.
"""

from __future__ import annotations

import torch

from parallel.compat import grouped_mm_supported

__all__ = ["grouped_mm", "grouped_mm_supported", "looped_mm"]


def looped_mm(x_ND: torch.Tensor, w_EDH: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Reference: rows [offsets[e-1], offsets[e]) of x times w[e], one matmul per expert.
    split/unbind (not slicing) so the backward concatenates instead of allocating a
    full-size zero gradient per expert."""
    counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    outs = [x @ w for x, w in zip(x_ND.split(counts), w_EDH.unbind(0), strict=True)]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_EDH.shape[-1])


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_EDH, offsets_E):
        ctx.save_for_backward(x_ND, w_EDH, offsets_E)
        return torch._grouped_mm(x_ND, w_EDH, offs=offsets_E)

    @staticmethod
    def backward(ctx, grad_NH):
        x_ND, w_EDH, offsets_E = ctx.saved_tensors
        grad_NH = grad_NH.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_NH, w_EDH.transpose(-2, -1), offs=offsets_E)
        if ctx.needs_input_grad[1]:
            # (D x N) @ (N x H) split along N by the offsets -> one D x H block per expert.
            grad_w = torch._grouped_mm(x_ND.t(), grad_NH, offs=offsets_E)
        return grad_x, grad_w, None


def _aligned(x_ND: torch.Tensor, w_EDH: torch.Tensor) -> bool:
    """`_grouped_mm` needs every row stride to be a multiple of 16 bytes."""
    size = x_ND.element_size()
    return all(n * size % 16 == 0 for n in (x_ND.shape[-1], w_EDH.shape[-1], w_EDH.shape[-2]))


# Eager even inside a torch.compile'd block: the probe must really run, and torch 2.13's
# tracing kernel for `_grouped_mm` accepts only bf16 while its CPU kernel also runs fp32.
@torch.compiler.disable
def grouped_mm(x_ND: torch.Tensor, w_EDH: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """x (tokens sorted by expert) @ w[expert of each row]; offsets are cumulative row ends."""
    if x_ND.dtype == w_EDH.dtype and grouped_mm_supported(x_ND.device.type, x_ND.dtype) and _aligned(x_ND, w_EDH):
        return _GroupedMM.apply(x_ND, w_EDH, offsets_E.to(torch.int32))
    return looped_mm(x_ND, w_EDH, offsets_E)
