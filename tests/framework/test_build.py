"""Sharded init at DeepSeek-V3 size: one rank of a 256-rank job (torch's fake process group
stands in for the others) builds its share of real V3-width layers without ever holding
the model. A fresh process, so its peak RSS is the build's own."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

BUILD_ONE_RANK = r"""
import json, resource, sys, torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from framework.build import build_sharded_model
from framework.model.args import ModelArgs
from parallel.layout import resolve_layout
from parallel.memory import local_bytes
from parallel.mesh import build_expert_mesh, build_mesh

rank, world = 37, 256
dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
# DeepSeek-V3's widths (configs/model/deepseek_v3.yaml), two of its 61 blocks: one dense, one MoE.
args = ModelArgs(
    dim=7168, n_layers=2, n_heads=128, n_kv_heads=128, vocab_size=129280, seq_len=4096, ffn_dim=18432,
    num_experts=256, num_shared_experts=1, top_k=8, expert_dim=2048, first_k_dense=1, n_groups=8, topk_groups=4,
)
layout = resolve_layout(world, 1, 1, world, 64)  # pp 1, dp_shard 256, ep 64
cpu = torch.device("cpu")
mesh, expert_mesh = build_mesh(layout, cpu), build_expert_mesh(layout, cpu)
model, n_params = build_sharded_model(args, 0, mesh, expert_mesh, "bf16", cpu, 8)
local = sum(local_bytes(p) for p in model.parameters())
w1 = model.layers["1"].ffn.experts.w1
print(json.dumps({
    "n_params": n_params, "local_bytes": local, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "w1_local": list(w1.to_local().shape), "w1_std": w1.to_local().std().item(),
}))
"""


def test_one_rank_of_a_deepseek_v3_size_job_builds_only_its_shard():
    out = subprocess.run([sys.executable, "-c", BUILD_ONE_RANK], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    whole_bytes = got["n_params"] * 4
    assert got["n_params"] > 12e9  # 2 V3 blocks + embedding and head: 49 GB in fp32
    assert got["local_bytes"] < 1.1 * whole_bytes / 256
    assert got["w1_local"] == [1, 7168, 2048]  # 256 experts / ep 64 / 4 expert-data-parallel shards
    assert abs(got["w1_std"] - 0.02) < 1e-3  # initialised, not left empty
    # torch itself takes a few hundred MB; the build adds little more than the shard.
    assert got["peak_rss"] < got["local_bytes"] + 1.5e9
