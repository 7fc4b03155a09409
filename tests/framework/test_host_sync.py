"""Host synchronisations in the training step are counted, so they cannot creep back."""

import re

import pytest
import torch
from omegaconf import OmegaConf

from framework.host_sync import count_host_syncs, step_flags
from scripts.benchlib import run_ranks
from tests.parallel.harness import make_config


def test_counter_sees_readbacks_and_ops_that_sync_on_cuda():
    x = torch.arange(6)
    with count_host_syncs() as syncs:
        x.sum().item()
        x.tolist()
        bool(x[0] > 1)
        float(x[1])
        torch.bincount(x)
        torch.repeat_interleave(x, x)  # output size read back
        torch.repeat_interleave(x, x, output_size=15)  # no read back
        x.cumsum(0)
    assert syncs.total == 6, syncs
    assert all("/test_host_sync.py:" in site for site in syncs.sites), syncs
    assert torch.Tensor.item.__name__ == "item" and torch.bincount(x).shape == (6,)  # patches undone


def test_step_flags_are_built_without_reading_back():
    with count_host_syncs() as syncs:
        flags = step_flags(torch.tensor(float("nan")), torch.tensor(1.0), stop_requested=True)
    assert syncs.total == 0, syncs
    assert flags.tolist() == [1.0, 1.0]
    assert step_flags(torch.tensor(2.0), torch.tensor(1.0), stop_requested=False).tolist() == [0.0, 0.0]


def _step_syncs(rank: int, world: int, cfg_yaml: str) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    trainer.train_step()  # the first step sets up (memory report, lazy FSDP init)
    with count_host_syncs() as syncs:
        trainer.train_step()
    return {"sites": dict(syncs.sites), "moe_layers": len(trainer.model.moe_layers())}


@pytest.mark.slow
def test_train_step_syncs_only_where_the_step_must(tmp_path):
    """Per step: one read of the all-reduced [non-finite, stop] flags; under EP one read of
    the split sizes per MoE layer and micro-batch (all_to_all_single needs them on the host)."""
    overrides = ["parallel.ep=2", "train.global_batch_size=4", "train.micro_batch_size=1"]  # 2 micro-batches
    result = run_ranks(_step_syncs, 2, OmegaConf.to_yaml(make_config(tmp_path, 2, overrides)))[0]
    sites = {re.sub(r":\d+$", "", site): n for site, n in result["sites"].items()}
    assert sites == {
        "Tensor.tolist at framework/train.py": 1,
        "Tensor.tolist at parallel/expert_parallel.py": 2 * result["moe_layers"],
    }, result["sites"]
