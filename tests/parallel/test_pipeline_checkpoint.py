"""A checkpoint saved at one pp resumes at another: parameter names are the same at every pp,
so DCP loads each stage's tensors into whichever rank holds them now (gloo, fp32)."""

import pytest
import torch

from tests.parallel.harness import train_segment

pytestmark = pytest.mark.slow

STEPS = 4
STOP = 2
COMMON = [f"train.steps={STEPS}", "checkpoint.keep=2"]
PP2 = ["parallel.pp=2", "parallel.pp_schedule=dualpipev"]
PP2_1F1B = ["parallel.pp=2", "parallel.pp_schedule=1f1b"]  # both stages hold the embedding (MTP)
PP2_DUALPIPE = ["parallel.pp=2", "parallel.pp_schedule=dualpipe"]  # both ranks hold the same (whole) model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 steps on one process, never stopped."""
    return train_segment(tmp_path_factory.mktemp("straight"), 1, COMMON, STEPS)["losses"]


@pytest.mark.parametrize(
    "first,second",
    [((2, PP2), (1, [])), ((1, []), (2, PP2)), ((2, PP2_1F1B), (1, [])), ((2, PP2_DUALPIPE), (1, []))],
    ids=["dualpipev pp=2 -> pp=1", "pp=1 -> dualpipev pp=2", "1f1b pp=2 -> pp=1", "dualpipe pp=2 -> pp=1"],
)
def test_resume_at_another_pp_continues_the_curve(first, second, uninterrupted, tmp_path):
    (w1, o1), (w2, o2) = first, second
    before = train_segment(tmp_path, w1, COMMON + o1, STOP)
    resumed = train_segment(tmp_path, w2, COMMON + o2, STEPS)
    assert resumed["start"] == STOP
    got = torch.tensor(
        [before["losses"][s] for s in range(1, STOP + 1)] + [resumed["losses"][s] for s in range(STOP + 1, STEPS + 1)]
    )
    want = torch.tensor([uninterrupted[s] for s in range(1, STEPS + 1)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
