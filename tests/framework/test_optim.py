"""The learning-rate schedule: linear warm-up, then cosine, linear or constant down to min_lr_ratio."""

import math
from types import SimpleNamespace

import pytest
import torch

from framework.optim import build_lr_scheduler, build_optimizer, lr_factor


def test_warmup_rises_linearly_to_the_peak():
    # Step s (0-based) runs with (s + 1) / warmup: the first step already moves, the last reaches 1.
    assert [lr_factor(s, 100, 4, "cosine", 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_starts_at_the_peak_and_ends_at_min_ratio(schedule):
    assert lr_factor(10, 110, 10, schedule, 0.1) == 1.0
    assert lr_factor(110, 110, 10, schedule, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 110, 10, schedule, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor


def test_cosine_and_linear_shapes_at_a_quarter_and_half_way():
    # 100 decay steps after 10 of warm-up; min ratio 0.2 leaves 0.8 to decay.
    assert lr_factor(35, 110, 10, "linear", 0.2) == pytest.approx(0.2 + 0.8 * 0.75)
    assert lr_factor(60, 110, 10, "linear", 0.2) == pytest.approx(0.6)
    assert lr_factor(35, 110, 10, "cosine", 0.2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(60, 110, 10, "cosine", 0.2) == pytest.approx(0.6)


def test_constant_holds_the_peak_after_warmup_and_no_warmup_starts_at_the_peak():
    assert [lr_factor(s, 50, 2, "constant", 0.1) for s in (0, 1, 2, 49, 80)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_factor(0, 50, 0, "cosine", 0.1) == 1.0


def test_decay_is_monotone():
    for schedule in ("cosine", "linear"):
        factors = [lr_factor(s, 60, 5, schedule, 0.05) for s in range(5, 61)]
        assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))


def test_scheduler_drives_every_param_group_and_decay_skips_norms():
    cfg = SimpleNamespace(
        lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, warmup_steps=2, schedule="linear", min_lr_ratio=0.0
    )
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]  # the matrix; the norm's weight and bias
    sched = build_lr_scheduler(opt, cfg, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expected = [1e-2 * f for f in (0.5, 1.0, 1.0, 0.75, 0.5, 0.25)]
    for lrs, want in zip(seen, expected, strict=True):
        assert lrs == pytest.approx([want, want])
