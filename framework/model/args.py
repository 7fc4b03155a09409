"""The model's shape: one dataclass, the `model` section of the config schema and the
argument every module that needs a size takes whole. Imports no torch (the launcher loads it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

SCORE_FUNCS = ("sigmoid", "softmax")


@dataclass
class ModelArgs:
    """DeepSeek-V3-style MoE transformer; every size comes from here."""

    name: str = "tiny"  # the config group's name (configs/model/NAME.yaml); the modules ignore it
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    vocab_size: int = 256
    seq_len: int = 128
    ffn_dim: int = 384  # hidden size of the dense SwiGLU blocks
    num_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    expert_dim: int = 64  # hidden size of one fine-grained expert
    first_k_dense: int = 1
    n_groups: int = 1
    topk_groups: int = 1
    score_func: str = "sigmoid"  # sigmoid | softmax
    route_scale: float = 1.0
    bias_update_speed: float = 0.001
    aux_loss_alpha: float = 0.0
    mtp_depth: int = 0
    mtp_weight: float = 0.3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> ModelArgs:
        """From the `model` section of a run config (a DictConfig) or any mapping of its keys."""
        return cls(**{f.name: model_cfg[f.name] for f in fields(cls) if f.name in model_cfg})
