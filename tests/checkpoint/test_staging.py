"""HostStager: a background copy into host buffers that later saves reuse."""

import pytest
import torch

from checkpoint.staging import HostStager


def _state(scale: float) -> dict:
    return {
        "model": {"w": torch.full((64, 64), scale), "b": torch.arange(8.0) * scale},
        "optim": {
            "state": {"w": {"step": torch.tensor(3.0 * scale), "exp_avg": torch.full((64, 64), -scale)}},
            "param_groups": [{"lr": 0.1 * scale, "betas": (0.9, 0.95), "params": ["w"]}],
        },
    }


def _leaves(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        out.update({f"{k}/{kk}": vv for kk, vv in _leaves(v).items()} if isinstance(v, dict) else {k: v})
    return out


def test_staged_copy_holds_the_values_of_stage_time_in_reused_buffers():
    stager = HostStager()
    source = _state(1.0)
    staged = stager.stage(source).result()
    stager.fence()
    src, got = _leaves(source), _leaves(staged)
    assert src.keys() == got.keys()
    for key, value in src.items():  # every tensor copied into its own buffer, the rest deep-copied
        if torch.is_tensor(value):
            assert torch.equal(got[key], value) and got[key].data_ptr() != value.data_ptr(), key
        else:
            assert got[key] == value and got[key] is not value, key
    for value in src.values():  # training moves on after the fence: the staged copy must not
        if torch.is_tensor(value):
            value.add_(5.0)
    source["optim"]["param_groups"][0]["lr"] = 99.0
    assert torch.equal(staged["model"]["w"], torch.full((64, 64), 1.0))
    assert torch.equal(staged["optim"]["state"]["w"]["step"], torch.tensor(3.0))
    assert staged["optim"]["param_groups"][0]["lr"] == 0.1

    pointers = {k: v.data_ptr() for k, v in got.items() if torch.is_tensor(v)}
    again = _leaves(stager.stage(_state(2.0)).result())
    assert {k: v.data_ptr() for k, v in again.items() if torch.is_tensor(v)} == pointers  # same host buffers
    for key, value in _leaves(_state(2.0)).items():  # and they hold the second save's values
        assert torch.equal(again[key], value) if torch.is_tensor(value) else again[key] == value, key
    stager.close()


def test_a_tensor_on_another_device_is_refused_by_name():
    stager = HostStager()
    with pytest.raises(ValueError, match="/model/w is on meta"):
        stager.stage({"model": {"w": torch.empty(2, device="meta")}})
    stager.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA branch needs a GPU (scripts/gpu_check.sh)")
def test_cuda_tensors_stage_into_pinned_buffers_on_a_side_stream_behind_the_fence():
    stager = HostStager()
    weights = torch.randn(1024, 1024, device="cuda")
    expected = weights.cpu()
    staged = stager.stage({"model": {"w": weights}, "step": torch.tensor(1.0)})
    stager.fence()
    weights.add_(1.0)  # an optimizer step on the compute stream, ordered after the copy by the fence
    result = staged.result()
    assert result["model"]["w"].is_pinned() and result["model"]["w"].device.type == "cpu"
    assert torch.equal(result["model"]["w"], expected)
    pointer = result["model"]["w"].data_ptr()
    again = stager.stage({"model": {"w": weights}, "step": torch.tensor(2.0)}).result()
    assert again["model"]["w"].data_ptr() == pointer and torch.equal(again["model"]["w"], weights.cpu())
    stager.close()
