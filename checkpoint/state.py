"""What a checkpoint holds, as DCP `Stateful`s registered once in one dict that save and load walk.

The kind of each entry decides where it goes: `ShardedState` (model, optimizer) through DCP,
resharded on load; `PerRankState` (RNG) one file per rank; anything else (sampler, scheduler,
counters) is plain JSON, the same on every rank, in trainer_state.json.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["AttributeState", "ModelState", "OptimizerState", "PerRankState", "RngState", "ShardedState", "Stateful"]


class ShardedState:
    """Tensors (possibly DTensors) that DCP writes shard by shard and reshards on load."""


class PerRankState:
    """State each rank has its own of; saved per rank. On another world size every rank gets
    rank 0's (`load_state_dict(state, same_rank=False)`)."""


class ModelState(ShardedState):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState(ShardedState):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class RngState(PerRankState):
    """The process-wide generators: torch (CPU and the current CUDA device) and Python's.
    Every rank seeds them the same, so rank 0's stream is the run's global stream: on another
    world size each rank continues it (per-rank divergence, if any, cannot be mapped)."""

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any], same_rank: bool = True) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class AttributeState:
    """Named attributes of an object (trainer counters, the logger's run id), saved as JSON."""

    def __init__(self, owner: object, *names: str) -> None:
        self.owner, self.names = owner, names

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self.owner, name) for name in self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.names:
            setattr(self.owner, name, state[name])
