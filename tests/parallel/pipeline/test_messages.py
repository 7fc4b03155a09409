"""The runtime's point-to-point messages with one tag for all (as NCCL, which matches a pair's
messages by order): each stage gets its own micro-batch's activation and gradient on 2 gloo
ranks, and the whole model trains as one process does (dualpipev, dualpipe, 1f1b at pp=2)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallel.pipeline import Action, Kind, build_schedule
from parallel.pipeline.runtime import PipelineRuntime
from scripts.benchlib import run_ranks
from tests.parallel.test_pipeline_parity import LAYOUTS, run

DIM, SEQ = 4, 3


def _stage(weights: nn.ParameterList, stage: int, tokens: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    x = tokens.float().unsqueeze(-1).expand(*tokens.shape, DIM) if h is None else h
    return torch.tanh(x * weights[stage] + stage)


def _loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (out**2).mean()  # its gradient differs per micro-batch: a swapped one shows


def _run(rank: int, world: int, name: str, microbatches: int, one_tag: bool, swap: bool, lookahead: int) -> dict:
    """One step of `name` on a chain of tanh stages; -> how many stage inputs were another
    micro-batch's, and whether the summed weight gradients equal the whole chain's on one rank."""
    schedule = build_schedule(name, world, microbatches)
    if swap:  # rank 1 posts micro-batch 1's receive before micro-batch 0's
        ops = schedule.actions[1]
        ops.insert(0, ops.pop(ops.index(Action(Kind.RECV_F, 1, 1, peer=0))))
    torch.manual_seed(0)
    weights = nn.ParameterList(nn.Parameter(1 + torch.rand(DIM)) for _ in range(schedule.num_stages))
    batches = [torch.full((1, SEQ + 1), m + 1) for m in range(microbatches)]
    wrong = []

    def stage_fn(stage: int, tokens: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        if h is not None:
            with torch.no_grad():
                expected = None
                for s in range(stage):
                    expected = _stage(weights, s, tokens, expected)
            wrong.append(not torch.equal(h, expected))
        return _stage(weights, stage, tokens, h)

    runtime = PipelineRuntime(
        schedule, rank, dist.group.WORLD, stage_fn, _loss, DIM, {}, one_tag=one_tag, recv_lookahead=lookahead
    )
    runtime.step(batches)
    grads = torch.stack([w.grad if w.grad is not None else torch.zeros(DIM) for w in weights])
    dist.all_reduce(grads)
    weights.zero_grad()
    for b in batches:  # the whole chain in one process
        h = None
        for s in range(schedule.num_stages):
            h = _stage(weights, s, b[:, :-1], h)
        (_loss(h, b[:, 1:]) / microbatches).backward()
    reference = torch.stack([w.grad for w in weights])
    return {"wrong": sum(wrong), "grads_match": torch.allclose(grads, reference, rtol=1e-6, atol=1e-7)}


def _run_cases(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    return [_run(rank, world, *case) for case in cases]


def test_one_tag_for_all_messages_matches_each_tensor():
    """Every tensor reaches its micro-batch with one tag (1f1b, interleaved, dualpipev, dualpipe
    at pp=2), its receive posted with its batch or 1 or 3 compute actions ahead; and the one-tag
    runtime checks the order for real: a schedule that receives out of send order is right with
    a tag per tensor and gives each micro-batch the other's activation with one tag."""
    sound = [("1f1b", 4, 1), ("interleaved_1f1b", 4, 0), ("dualpipev", 4, 3), ("dualpipe", 4, 1), ("dualpipev", 6, 0)]
    cases = [(name, n, True, False, ahead) for name, n, ahead in sound]
    cases += [("gpipe", 2, False, True, 0), ("gpipe", 2, True, True, 0)]
    results = run_ranks(_run_cases, 2, cases, timeout_s=120)
    for rank in results:
        for case, result in zip(cases[: len(sound)], rank, strict=False):
            assert result == {"wrong": 0, "grads_match": True}, case
    tagged, one_tag = results[1][-2], results[1][-1]  # rank 1 receives
    assert tagged == {"wrong": 0, "grads_match": True}
    assert one_tag["wrong"] == 2 and not one_tag["grads_match"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), 1, [])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["1f1b pp=2", "dualpipev pp=2", "dualpipe pp=2"])
def test_the_model_trains_as_one_process_with_one_tag(name, one_process, tmp_path, monkeypatch):
    """The whole model, 3 steps, every message on tag 0 (the spawned ranks inherit the variable):
    losses, gradient norms, the validation loss after them (forward_only's messages) and final
    weights as test_pipeline_parity.py checks them."""
    world, model, parallel = LAYOUTS[name]
    assert model == [] and world == 2
    monkeypatch.setenv("MOE_PP_ONE_TAG", "1")
    got = run(tmp_path, world, parallel)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one_process["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        torch.tensor(got["grad_norms"]), torch.tensor(one_process["grad_norms"]), rtol=1e-5, atol=0
    )
    assert got["val_loss"] == pytest.approx(one_process["val_loss"], rel=1e-5)
    assert got["state"].keys() == one_process["state"].keys()
    for key, ref in one_process["state"].items():
        torch.testing.assert_close(got["state"][key], ref, rtol=1e-5, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")
