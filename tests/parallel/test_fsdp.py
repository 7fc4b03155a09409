"""FSDP2 mixed precision on real gloo ranks: bf16 compute, fp32 master weights and grads."""

import pytest
import torch
from omegaconf import OmegaConf

from scripts.benchlib import run_ranks
from tests.parallel.harness import make_config

pytestmark = pytest.mark.slow


def _bf16_training(rank: int, world: int, cfg_yaml: str) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    model = trainer.model
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = module.weight.dtype if hasattr(module, "weight") else module.w1.dtype

        return hook

    model.layers["1"].attn.wq.register_forward_pre_hook(record("block"))
    model.layers["1"].ffn.experts.register_forward_pre_hook(record("experts"))
    model.layers["1"].ffn.router.register_forward_pre_hook(record("router"))
    model.head.register_forward_pre_hook(record("head"))
    losses = [trainer.train_step()[0].item() for _ in range(15)]
    return {
        "compute": {k: str(v) for k, v in seen.items()},
        "master": sorted({str(p.dtype) for p in model.parameters()}),
        "first": losses[0],
        "last": sum(losses[-3:]) / 3,
    }


def test_bf16_compute_with_fp32_master_weights_trains(tmp_path):
    cfg = make_config(tmp_path, 2, ["parallel.ep=2", "train.precision=bf16", "model.dim=64", "model.expert_dim=32"])
    result = run_ranks(_bf16_training, 2, OmegaConf.to_yaml(cfg))[0]
    assert result["compute"] == {
        "block": "torch.bfloat16",
        "experts": "torch.bfloat16",
        "router": "torch.float32",
        "head": "torch.float32",
    }
    assert result["master"] == ["torch.float32"]
    assert result["last"] < result["first"] - 0.3
