"""A checkpoint saved at one pp resumes at another: parameter names are the same at every pp,
so DCP loads each stage's tensors into whichever rank holds them now (gloo, fp32)."""

import pytest
import torch

from tests.parallel.harness import train_segment

pytestmark = pytest.mark.slow

STEPS = 4
COMMON = [f"train.steps={STEPS}", "checkpoint.keep=2"]
PP1 = (1, [])
PP2 = (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"])
PP2_1F1B = (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"])  # both stages hold the embedding (MTP)
PP4 = (4, ["parallel.pp=4", "parallel.pp_schedule=1f1b"])  # embed+layers.0 | layers.1 | layers.2 | head+MTP
PP2_DUALPIPE = (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipe"])  # both ranks hold the same (whole) model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 steps on one process, never stopped: the losses and the RNG draws after each step."""
    return train_segment(tmp_path_factory.mktemp("straight"), 1, COMMON, STEPS)


# Each launch: (world, overrides, the step it stops at); each resumes from the one before it.
@pytest.mark.parametrize(
    "launches",
    [
        [(*PP2, 2), (*PP1, STEPS)],
        [(*PP1, 2), (*PP2, STEPS)],
        [(*PP2_1F1B, 2), (*PP1, STEPS)],
        [(*PP2, 1), (*PP1, 2), (*PP4, STEPS)],  # the data position and RNG travel through every launch
        [(*PP2_DUALPIPE, 2), (*PP1, STEPS)],
    ],
    ids=[
        "dualpipev pp=2 -> pp=1",
        "pp=1 -> dualpipev pp=2",
        "1f1b pp=2 -> pp=1",
        "dualpipev pp=2 -> pp=1 -> pp=4",
        "dualpipe pp=2 -> pp=1",
    ],
)
def test_resume_at_another_pp_continues_the_curve(launches, uninterrupted, tmp_path):
    losses, draws, step = {}, {}, 0
    for world, overrides, stop in launches:
        segment = train_segment(tmp_path, world, COMMON + overrides, stop)
        assert segment["start"] == step  # resumed where the last launch saved
        assert segment["losses"].keys() == set(range(step + 1, stop + 1))
        losses.update(segment["losses"])
        draws.update(segment["draws"])
        step = stop
    got = torch.tensor([losses[s] for s in range(1, STEPS + 1)])
    want = torch.tensor([uninterrupted["losses"][s] for s in range(1, STEPS + 1)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # the same data, in the same order
    assert draws == uninterrupted["draws"]  # the RNG streams on where it stopped, not from the seed
