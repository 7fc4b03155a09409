"""CpuStager: a background copy into host buffers that later saves reuse."""

import pytest
import torch

from checkpoint.staging import CpuStager


def _state(scale: float) -> dict:
    return {
        "model": {"w": torch.full((64, 64), scale), "b": torch.arange(8.0) * scale},
        "optim": {
            "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.full((64, 64), -scale)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}],
        },
    }


def test_staged_copy_is_detached_from_the_source_and_buffers_are_reused():
    stager = CpuStager()
    source = _state(1.0)
    staged = stager.stage(source).result()
    assert torch.equal(staged["model"]["w"], source["model"]["w"])
    assert staged["model"]["w"].data_ptr() != source["model"]["w"].data_ptr()
    assert staged["optim"]["param_groups"] == source["optim"]["param_groups"]
    source["model"]["w"].add_(5.0)  # training moves on after staging
    assert torch.equal(staged["model"]["w"], torch.full((64, 64), 1.0))

    again = stager.stage(_state(2.0)).result()
    assert again["model"]["w"].data_ptr() == staged["model"]["w"].data_ptr()  # same host buffer
    assert torch.equal(again["optim"]["state"]["w"]["exp_avg"], torch.full((64, 64), -2.0))
    stager.close()


def test_a_tensor_off_the_cpu_is_refused_by_name():
    stager = CpuStager()
    with pytest.raises(ValueError, match="/model/w is on meta"):
        stager.stage({"model": {"w": torch.empty(2, device="meta")}})
    stager.close()
