"""A resumed run's new optimizer config applied over the state loaded from the checkpoint.

Loading puts the checkpoint's lr, betas, eps and weight decay back into the param groups and its
base LRs into the scheduler; the launcher told the user the new values win, so here they do.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.optim import build_optimizer


def apply_optim_config(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, optim_cfg) -> None:
    """Hyper-parameters from `optim_cfg` (as build_optimizer sets them), and the LR of the
    current step from the new peak LR and the scheduler's (new) lambda; state is kept."""
    fresh = build_optimizer(model, optim_cfg)  # param groups only: AdamW allocates state at its first step
    for group, new in zip(optimizer.param_groups, fresh.param_groups, strict=True):
        group.update({key: value for key, value in new.items() if key != "params"})
    scheduler.base_lrs = [group["lr"] for group in fresh.param_groups]
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)  # last_epoch = optimizer steps taken
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def apply_resume_changes(resumed_from, model: nn.Module, optimizer, scheduler, optim_cfg, logger) -> None:
    """After a checkpoint load: apply the new optimizer config and mark the resume in
    metrics.jsonl (step, checkpoint, the LR training continues with). No-op on a fresh start."""
    if resumed_from is None:
        return
    apply_optim_config(model, optimizer, scheduler, optim_cfg)
    logger.log(
        {
            "step": resumed_from.step,
            "event": "resume",
            "checkpoint": str(resumed_from.path),
            "lr": scheduler.get_last_lr()[0],
        }
    )
