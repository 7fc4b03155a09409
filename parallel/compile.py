"""torch.compile applied per block: each transformer block and MTP module runs compiled.

Only `forward` is compiled, so the module tree, parameter names (checkpoints) and FSDP2's
hooks (which run eagerly around it) stay as they are; compile and FSDP2 compose in either
order. Expert parallelism's all-to-all needs its split sizes on the host, so the MoE
block's graph breaks there and compiles as the pieces around it.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_compile(model: nn.Module) -> int:
    """Compile the forward of every block in `model.layers` and `model.mtp`. -> how many."""
    blocks = list(model.layers.values()) + list(getattr(model, "mtp", []))
    for block in blocks:
        # dynamic=None: the first call compiles for its shapes; a changing size (the number
        # of tokens routed to this rank's experts) recompiles once, as a dynamic dimension.
        block.forward = torch.compile(block.forward)
    return len(blocks)
