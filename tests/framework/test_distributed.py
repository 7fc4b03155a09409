"""train.device -> this rank's device and process-group backend."""

import pytest
import torch

from framework.distributed import pick_device


@pytest.mark.parametrize("gpu_visible", [False, True])
def test_cpu_means_gloo_even_where_a_gpu_is_visible(monkeypatch, gpu_visible):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_visible)
    assert pick_device("cpu", 3) == (torch.device("cpu"), "gloo")


def test_auto_follows_what_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 0) == (torch.device("cpu"), "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", 3) == (torch.device("cuda", 1), "nccl")
    assert pick_device("cuda", 2) == (torch.device("cuda", 0), "nccl")


def test_cuda_without_a_gpu_and_unknown_devices_fail_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"^train.device=cuda: this process sees no CUDA device"):
        pick_device("cuda", 0)
    with pytest.raises(ValueError, match=r"^train.device=tpu: allowed: auto, cpu, cuda$"):
        pick_device("tpu", 0)
