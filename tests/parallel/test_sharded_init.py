"""Sharded init: a model built on the meta device and initialised shard by shard holds,
gathered, exactly the weights a plain single-process init gives, on every layout."""

import pytest
import torch
from omegaconf import OmegaConf

from scripts.benchlib import run_ranks
from tests.parallel.harness import make_config

pytestmark = pytest.mark.slow


def _built_weights(rank: int, world: int, cfg_yaml: str) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer
    from parallel.full_state import full_state_dict
    from parallel.memory import local_bytes

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    local = sum(local_bytes(p) for p in trainer.model.parameters())
    return {"state": full_state_dict(trainer.model), "local_bytes": local}


def _plain_weights(cfg) -> dict:
    from framework.model.transformer import ModelArgs, MoETransformer

    model = MoETransformer(ModelArgs.from_config(cfg.model))
    model.init_weights(cfg.train.seed)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("world", "overrides"),
    [
        (2, ["parallel.ep=2"]),
        # experts split over ep=2 and FSDP-sharded over the other 2 (a strided shard)
        (4, ["parallel.ep=2", "parallel.dp_shard=4"]),
        (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "model.vocab_size=67"]),  # uneven rows: padding
    ],
)
def test_sharded_init_equals_plain_init(tmp_path, world, overrides):
    cfg = make_config(tmp_path, world, overrides + ["train.seed=7"])
    got = run_ranks(_built_weights, world, OmegaConf.to_yaml(cfg))[0]
    ref = _plain_weights(cfg)
    assert got["state"].keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got["state"][key], value), key
    total = sum(v.numel() * v.element_size() for v in ref.values() if v.is_floating_point())
    assert got["local_bytes"] < 0.6 * total  # rank 0 holds a shard, not the model
