"""train.compile=true: every block runs through torch.compile, under FSDP2 and expert
parallelism, and trains as the eager model does."""

import pytest
import torch
from omegaconf import OmegaConf

from scripts.benchlib import run_ranks
from tests.parallel.harness import make_config

pytestmark = pytest.mark.slow

# Two blocks (one dense, one MoE), no MTP: every kind of block, as few graphs as possible
# (inductor compiles C++ on the CPU: about a minute on 2 cores).
SMALL = ["model.n_layers=2", "model.mtp_depth=0", "train.global_batch_size=4", "train.micro_batch_size=1"]


def _losses(rank: int, world: int, cfg_yaml: str, steps: int) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    compiled = [type(block.forward).__name__ for block in trainer.model.layers.values()]
    losses = [trainer.train_step()[0].item() for _ in range(steps)]
    return {"losses": losses, "compiled": compiled}


def test_compiled_blocks_with_fsdp_and_ep_match_eager(tmp_path):
    """Three steps: the first compiles, the second recompiles once with the routed-token
    count as a dynamic size, the third runs the compiled code."""
    layout = ["parallel.ep=2", *SMALL]
    eager = run_ranks(_losses, 2, OmegaConf.to_yaml(make_config(tmp_path / "eager", 2, layout)), 3)[0]
    cfg = make_config(tmp_path / "compiled", 2, [*layout, "train.compile=true"])
    compiled = run_ranks(_losses, 2, OmegaConf.to_yaml(cfg), 3, timeout_s=900)[0]
    assert eager["compiled"] == ["method", "method"]
    assert compiled["compiled"] == ["function", "function"]  # torch.compile's wrapper of forward
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4, abs=1e-4)
