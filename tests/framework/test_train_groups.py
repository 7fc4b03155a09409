"""The trainer's pipeline groups are warmed up at setup: on each group a pipeline step uses
(pipeline, DualPipe mirror pair, MTP embedding copy) a collective with every member runs
before the first step, so the step's first batch_isend_irecv (two ranks) is not the first."""

import pytest
import torch
from omegaconf import OmegaConf

from framework.config import Config
from scripts.benchlib import run_ranks
from tests.parallel.harness import make_config

pytestmark = pytest.mark.slow

PP2_DP2 = ["parallel.pp=2", "parallel.dp_shard=2"]  # the pipeline groups are [0, 2] and [1, 3], not the world


def _collectives_before_the_first_step(rank: int, world: int, cfg_yamls: list[str]) -> list[dict]:
    """Per config: how many collectives each of this rank's groups has run once the trainer is
    built (gloo's sequence number per group; None: the rank is in no such group)."""
    from framework.distributed import DistContext
    from framework.train import Trainer

    counts = []
    for cfg_yaml in cfg_yamls:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
        trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
        groups = {"pp": trainer.groups.pp, "mirror": trainer.mirror_group, "embed_copy": trainer.embed_copy_group}
        counts.append({k: None if g is None else g._get_sequence_number_for_group() for k, g in groups.items()})
    return counts


def test_pipeline_groups_run_a_collective_before_the_first_step(tmp_path):
    """1f1b (the last stage's MTP copy of the embedding) and dualpipe (mirror pairs) at pp=2 x
    dp_shard=2. Without the warm-up every count here is 0 (nothing else touches these groups
    before the first step)."""
    cfgs = [
        OmegaConf.to_yaml(make_config(tmp_path / schedule, 4, [*PP2_DP2, f"parallel.pp_schedule={schedule}"]))
        for schedule in ("1f1b", "dualpipe")
    ]
    for rank, (f1b, dualpipe) in enumerate(run_ranks(_collectives_before_the_first_step, 4, cfgs)):
        assert f1b["pp"] >= 1 and f1b["embed_copy"] >= 1 and f1b["mirror"] is None, (rank, f1b)
        assert dualpipe["pp"] >= 1 and dualpipe["mirror"] >= 1 and dualpipe["embed_copy"] is None, (rank, dualpipe)
