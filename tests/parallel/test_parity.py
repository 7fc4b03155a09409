"""Parity: every parallel layout trains exactly like one process (fp32, gloo).

Same seed, data and global batch; 5 optimizer steps; the loss at every step, the final
weights, the per-expert token counts and the router biases must match the single process.
"""

import pytest
import torch

from tests.parallel.harness import run_layout

pytestmark = pytest.mark.slow

LAYOUTS = {
    "dp_shard=2": (2, ["parallel.dp_shard=2"]),
    "ep=2": (2, ["parallel.ep=2"]),
    "dp_replicate=2 x dp_shard=2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "ep=4": (4, ["parallel.ep=4"]),
    # 8 ranks: 2 replicas x dp_shard 4, experts split over ep=2 and sharded over the other 2
    "ep=2 x dp_shard=4 x dp_replicate=2": (8, ["parallel.ep=2", "parallel.dp_shard=4", "parallel.dp_replicate=2"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("ref"), 1, [])


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """Each layout trains once per module; the parity and the bytes tests read the same run."""
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            world, overrides = LAYOUTS[name]
            cache[name] = run_layout(tmp_path_factory.mktemp("layout"), world, overrides)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, layout_runs):
    got = layout_runs(name)

    ref_losses = torch.tensor(reference["losses"])
    assert ref_losses[-1] < ref_losses[0]  # it trained
    torch.testing.assert_close(torch.tensor(got["losses"]), ref_losses, rtol=1e-5, atol=0)

    # Per-expert token counts summed over all ranks equal the single-process counts.
    for step, (a, b) in enumerate(zip(got["loads"], reference["loads"], strict=True)):
        assert torch.equal(a, b), f"expert loads differ at step {step + 1}"

    # The aux-loss-free bias is identical on every rank, and equal to the reference.
    for rank_bias in got["biases"]:
        assert torch.equal(rank_bias, got["biases"][0])
    assert torch.equal(got["biases"][0], reference["biases"][0])

    # Weights: a different reduction order changes gradients by fp32 rounding; where a
    # gradient is a near-cancelling sum, Adam's m/sqrt(v) turns that into up to ~1% of one
    # step's update (lr 3e-3). atol 2e-5 is 0.13% of the largest possible 5-step move.
    assert got["state"].keys() == reference["state"].keys()
    for key, ref in reference["state"].items():
        torch.testing.assert_close(got["state"][key], ref, rtol=1e-5, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["dp_shard=2", "ep=4", "dp_replicate=2 x dp_shard=2"])
def test_sharded_bytes_per_rank(name, reference, layout_runs):
    """Each rank holds 1/dp_shard of the parameters and optimizer state (plus padding), read at
    the first step (Trainer.peak_memory), from the parity test's run of the same layout."""
    got = layout_runs(name)
    total = reference["memory"][0]
    shard = {"dp_shard=2": 2, "ep=4": 4, "dp_replicate=2 x dp_shard=2": 2}[name]
    for rank_memory in got["memory"]:
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            assert rank_memory[key] == pytest.approx(total[key] / shard, rel=0.05), key
