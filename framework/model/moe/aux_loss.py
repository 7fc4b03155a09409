"""The MoE auxiliary loss rides on the activations instead of the return values.

`attach_aux_loss(out, aux)` returns `out` unchanged; in the backward it also sends a
gradient of `scale` into `aux` (Megatron-Core's MoEAuxLossAutoScaler does the same). So a
block returns one tensor, a pipeline stage passes one tensor on, and the loss function never
needs to collect the layers' aux losses. The trainer sets the scale to 1/micro-batches, the
factor the main loss's backward gets.
"""

from __future__ import annotations

import torch

_backward_scale = 1.0


def set_aux_loss_scale(scale: float) -> None:
    """The gradient each attached aux loss receives (1/micro-batches: the loss is a mean)."""
    global _backward_scale
    _backward_scale = float(scale)


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype, ctx.aux_device = aux.shape, aux.dtype, aux.device
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_aux = torch.full(ctx.aux_shape, _backward_scale, dtype=ctx.aux_dtype, device=ctx.aux_device)
        return grad_out, grad_aux


def attach_aux_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """`out`, whose backward also backpropagates `scale * aux`."""
    if not aux.requires_grad:
        return out
    return _AttachAuxLoss.apply(out, aux)
