"""HSDP with FSDP2: dense weights on the (dp_replicate, dp_shard) mesh, experts on theirs.

Each block, MTP module, the embedding and the root (final norm, head) is one FSDP unit; inside
an MoE block the experts are their own unit on the expert-data-parallel mesh, so their
gradients are reduced only over the ranks that hold the same experts. bf16 compute with fp32
master weights and fp32 gradient reduction; the embedding, the root and routers stay fp32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallel.compat import set_gradient_divide_factor, set_unshard_in_backward

FP32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, expert_dp_mesh: DeviceMesh, precision: str) -> nn.Module:
    compute = BF16 if precision == "bf16" else FP32
    dp_size = dp_mesh.size()
    for moe in model.moe_layers():  # inner units first: the block's unit takes the rest
        fully_shard(moe.experts, mesh=expert_dp_mesh, mp_policy=compute)
        # Each expert's gradient sums the contributions of every data-parallel rank
        # (through the all-to-all), so divide by all dp ranks, not just its own mesh.
        set_gradient_divide_factor(moe.experts, dp_size, expert_dp_mesh.size(1))
        if precision == "bf16":
            # Its output (a Routing dataclass) is registered as a pytree node, so FSDP2
            # hooks its pre-backward re-gather on the routing tensors on every torch.
            fully_shard(moe.router, mesh=dp_mesh, mp_policy=FP32)
    for block in list(model.layers.values()) + list(model.mtp):
        fully_shard(block, mesh=dp_mesh, mp_policy=compute)
    if model.embed is not None:  # a pipeline rank without the embedding has dropped it
        # Its own unit, resharded after each forward: in the root it stayed gathered (fp32,
        # vocab x dim) from the forward to the end of the backward. Its backward reads only the
        # token ids, so it is not gathered there: the gradient lands in the unsharded parameter,
        # whose data stays freed, and is reduce-scattered with the rest.
        fully_shard(model.embed, mesh=dp_mesh, mp_policy=FP32)
        set_unshard_in_backward(model.embed, False)
    # The root: the final norm and the head. The head's backward runs first, at the activation
    # peak, so its own unit would be gathered again right there: no smaller peak, more gathers.
    fully_shard(model, mesh=dp_mesh, mp_policy=FP32)
    return model
