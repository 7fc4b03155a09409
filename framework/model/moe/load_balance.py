"""Auxiliary-loss-free load balancing across ranks (DeepSeek-V3): before each optimizer
step, sum every MoE layer's expert load over the data-parallel group and nudge its bias.

Installed as an optimizer pre-step hook (as torchtitan does), so the train loop never
sees it; the data-parallel group holds the same layers on every rank, also under pipelining.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from framework.model.moe.layer import MoE


class ExpertLoadBalancer:
    def __init__(self, moe_layers: list[MoE], speed: float, dp_group: dist.ProcessGroup | None):
        self.layers, self.speed, self.group = moe_layers, speed, dp_group
        # [layers, experts]: the global load of the last step, for the metrics.
        self.last_loads_LE = torch.zeros(0)

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.update())

    @torch.no_grad()
    def update(self) -> None:
        """Every rank moves its biases by the same all-reduced load, so they stay identical."""
        if not self.layers:
            return
        loads_LE = torch.stack([m.tokens_per_expert for m in self.layers])
        if self.group is not None:
            dist.all_reduce(loads_LE, group=self.group)
        for moe, load_E in zip(self.layers, loads_LE, strict=True):
            moe.router.update_bias(load_E, self.speed)
            moe.tokens_per_expert.zero_()
        self.last_loads_LE = loads_LE

    @torch.no_grad()
    def discard(self) -> None:
        """A skipped step's routing must not move the biases."""
        for moe in self.layers:
            moe.tokens_per_expert.zero_()
        self.last_loads_LE = torch.zeros(0)
