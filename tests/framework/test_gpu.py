"""Single-GPU checks (skipped without CUDA; scripts/gpu_check.sh runs them on a GPU node):
bf16 training with FSDP2 on the installed torch, compiled blocks, the step's host syncs as
CUDA's debug mode sees them, and the matmul rate mfu divides by."""

import pytest
import torch
from omegaconf import OmegaConf

from scripts.benchlib import run_ranks
from tests.parallel.harness import make_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = ["train.device=cuda", "model.dim=256", "model.expert_dim=128", "model.n_heads=4", "model.n_kv_heads=2"]


def _train_steps(rank: int, world: int, cfg_yaml: str, steps: int) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.host_sync import count_host_syncs
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cuda", rank)))
    losses = [trainer.train_step()[0].item() for _ in range(steps)]
    torch.cuda.synchronize()
    with count_host_syncs() as syncs:
        trainer.train_step()
        torch.cuda.synchronize()
    sites = {s: n for s, n in syncs.sites.items() if "test_gpu.py" not in s}  # the synchronize() above
    return {"losses": losses, "syncs": sites}


def test_bf16_fsdp_training_on_cuda(tmp_path):
    """The router is its own fp32 FSDP unit under bf16: backward must find its weight re-gathered."""
    cfg = make_config(tmp_path, 1, [*CUDA, "train.precision=bf16"])
    result = run_ranks(_train_steps, 1, OmegaConf.to_yaml(cfg), 8, device="cuda")[0]
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0]


def test_one_host_sync_per_step_on_cuda(tmp_path):
    """CUDA's sync debug mode sees every sync, kernels that sync inside included: one is
    the flags read of train_step; any other is named in the failure."""
    cfg = make_config(tmp_path, 1, [*CUDA, "train.precision=bf16"])
    result = run_ranks(_train_steps, 1, OmegaConf.to_yaml(cfg), 2, device="cuda")[0]
    assert sum(result["syncs"].values()) <= 1, result["syncs"]


def test_compiled_blocks_match_eager_on_cuda(tmp_path):
    eager = run_ranks(_train_steps, 1, OmegaConf.to_yaml(make_config(tmp_path / "a", 1, [*CUDA])), 4, device="cuda")[0]
    compiled = run_ranks(
        _train_steps, 1, OmegaConf.to_yaml(make_config(tmp_path / "b", 1, [*CUDA, "train.compile=true"])), 4,
        device="cuda",
    )[0]  # fmt: skip
    assert torch.allclose(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=2e-3, atol=2e-3)


def test_grouped_gemm_kernel_and_peak_rate_on_cuda(capsys):
    from framework.flops import PEAK_MATMUL_SIZE, measure_peak_flops
    from parallel.compat import grouped_mm_supported

    assert grouped_mm_supported("cuda", torch.bfloat16)
    peak = measure_peak_flops(torch.device("cuda"), torch.bfloat16)
    name = torch.cuda.get_device_name()
    with capsys.disabled():
        print(f"\n{PEAK_MATMUL_SIZE['cuda']}^3 bf16 matmul on {name}: {peak / 1e12:.0f} TFLOP/s")
    assert peak > 1e13  # any GPU this targets does more than 10 TFLOP/s in bf16
