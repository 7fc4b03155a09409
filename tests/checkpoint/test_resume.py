"""Stop, resume, reshard: the loss curve continues as if the run had never stopped."""

import pytest
import torch

from checkpoint.commit import step_dir_name
from tests.parallel.harness import train_segment

pytestmark = pytest.mark.slow

STEPS = 8
STOP = 4
COMMON = [f"train.steps={STEPS}", "checkpoint.keep=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """8 steps on 2 ranks (ep=2), never stopped."""
    return train_segment(tmp_path_factory.mktemp("straight"), 2, COMMON + ["parallel.ep=2"], STEPS)["losses"]


def test_resume_same_layout_is_bitwise_identical(uninterrupted, tmp_path):
    first = train_segment(tmp_path, 2, COMMON + ["parallel.ep=2"], STOP)
    second = train_segment(tmp_path, 2, COMMON + ["parallel.ep=2"], STEPS)
    assert first["start"] == 0 and second["start"] == STOP
    for step in range(STOP + 1, STEPS + 1):
        assert second["losses"][step] == uninterrupted[step], f"step {step}"  # bitwise


def test_async_save_overlapping_training_holds_the_weights_of_its_step(uninterrupted, tmp_path):
    """An async save at step 4 copies the state in the background while steps 5.. train on
    (the optimizer waits for the copy, not for the write). Resuming from it is bitwise
    identical to never stopping, so no later update leaked into the checkpoint."""
    overlapped = COMMON + ["parallel.ep=2", "checkpoint.async=true"]
    first = train_segment(tmp_path, 2, overlapped, STEPS, save_at=(STOP,))
    for step in range(1, STEPS + 1):
        assert first["losses"][step] == uninterrupted[step], f"step {step}"  # saving changed nothing
    resumed = train_segment(
        tmp_path, 2, overlapped + [f"resume={tmp_path / 'checkpoints' / step_dir_name(STOP)}"], STEPS
    )
    assert resumed["start"] == STOP
    for step in range(STOP + 1, STEPS + 1):
        assert resumed["losses"][step] == uninterrupted[step], f"step {step}"


RESHARD = {
    "4 ranks (ep=2, dp_shard=2) -> 2 (ep=2)": ((4, ["parallel.ep=2"]), (2, ["parallel.ep=2"])),
    "2 ranks -> 4 ranks (ep=2)": ((2, ["parallel.ep=2"]), (4, ["parallel.ep=2"])),
    "ep=2 -> ep=1": ((2, ["parallel.ep=2"]), (2, ["parallel.ep=1"])),
    "2 ranks (ep=2) -> 1 process": ((2, ["parallel.ep=2"]), (1, [])),
}


@pytest.mark.parametrize("name", list(RESHARD))
def test_resume_on_another_layout_continues_the_curve(name, uninterrupted, tmp_path):
    (w1, o1), (w2, o2) = RESHARD[name]
    train_segment(tmp_path, w1, COMMON + o1, STOP)
    resumed = train_segment(tmp_path, w2, COMMON + o2, STEPS)
    assert resumed["start"] == STOP
    got = torch.tensor([resumed["losses"][s] for s in range(STOP + 1, STEPS + 1)])
    want = torch.tensor([uninterrupted[s] for s in range(STOP + 1, STEPS + 1)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
