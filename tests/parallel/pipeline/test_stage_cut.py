"""The cost-based stage cut: the cost model's pieces, the optimal min-max contiguous cut, and
the placement rules (head with its MTP modules; embedding and head on one rank for DualPipe)."""

import itertools
import random
from pathlib import Path

import pytest
import yaml

from parallel.pipeline.stage_cut import Piece, cut_stages, model_pieces, plan_stages

TINY = yaml.safe_load((Path(__file__).parents[3] / "configs" / "model" / "tiny.yaml").read_text())


def pieces(*costs: float) -> list[Piece]:
    return [Piece(f"layers.{i}", float(c)) for i, c in enumerate(costs)]


def brute_force_max(costs: list[float], k: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), k - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_cut_is_the_optimal_min_max_contiguous_cut():
    rng = random.Random(0)
    for _ in range(60):
        costs = [rng.choice([1, 2, 3, 5, 8]) for _ in range(rng.randint(2, 9))]
        k = rng.randint(1, len(costs))
        stages = cut_stages(pieces(*costs), k)
        assert len(stages) == k and all(stages)
        assert [p.cost for s in stages for p in s] == costs  # contiguous, in order, nothing lost
        assert max(sum(p.cost for p in s) for s in stages) == brute_force_max(costs, k)


def test_ties_go_to_the_more_even_cut():
    assert [[p.cost for p in s] for s in cut_stages(pieces(4, 1, 1, 1, 1), 2)] == [[4.0], [1.0] * 4]
    assert [[p.cost for p in s] for s in cut_stages(pieces(1, 1, 1, 1, 1, 1), 3)] == [[1.0, 1.0]] * 3


def test_model_pieces_cost_moe_dense_head_and_mtp():
    model = dict(TINY, mtp_depth=1)
    names = [p.name for p in model_pieces(model)]
    assert names == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head", "mtp.0"]
    cost = {p.name: p.cost for p in model_pieces(model)}
    assert cost["embed"] == 0.0
    assert cost["layers.1"] == cost["layers.2"] == cost["layers.3"] != cost["layers.0"]  # MoE vs dense
    # dense SwiGLU: 3 x dim x ffn_dim; MoE: (top_k + shared) experts of expert_dim, plus the router
    ffn_gap = 6 * 3 * 128 * 384 - 6 * (3 * 128 * 96 * 3 + 128 * 8)
    assert cost["layers.0"] - cost["layers.1"] == ffn_gap
    assert cost["head"] == 6 * 128 * 256
    assert cost["mtp.0"] > cost["layers.1"] + cost["head"]  # a block, a projection and the shared head
    with pytest.raises(ValueError, match="model config lacks vocab_size"):
        model_pieces({k: v for k, v in model.items() if k != "vocab_size"})


def test_head_and_mtp_modules_stay_together():
    costs = [Piece("embed", 0.0), *pieces(5, 5, 5), Piece("head", 1.0), Piece("mtp.0", 9.0), Piece("mtp.1", 9.0)]
    stages = cut_stages(costs, 3)
    assert [p.name for p in stages[-1]] == ["head", "mtp.0", "mtp.1"]


def test_cut_follows_cost_not_block_count():
    """A heavy head (large vocabulary) takes a stage of its own instead of a quarter of the blocks."""
    model = dict(TINY, vocab_size=32768, n_layers=8, mtp_depth=0)
    plan = plan_stages(model_pieces(model), "1f1b", 4)
    assert plan.stages[-1] == ("head",)
    assert sum(len(s) for s in plan.stages[:-1]) == 9  # embed + 8 blocks over the other three


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_dualpipe_puts_embedding_and_head_with_mtp_on_one_rank(schedule):
    model = dict(TINY, n_layers=12, mtp_depth=1)
    plan = plan_stages(model_pieces(model), schedule, 4)
    assert len(plan.stages) == (8 if schedule == "dualpipev" else 4)
    assert plan.stages[0][0] == "embed" and plan.stages[-1][-2:] == ("head", "mtp.0")
    head_direction = 0 if schedule == "dualpipev" else 1  # DualPipe: the reverse copy's head
    assert plan.rank_of_piece("embed") == plan.rank_of_piece("mtp.0", head_direction) == 0


def test_plan_for_one_f_one_b_and_interleaved():
    model = dict(TINY, n_layers=16)
    assert plan_stages(model_pieces(model), "1f1b", 4).rank_of_piece("head") == 3
    interleaved = plan_stages(model_pieces(model), "interleaved_1f1b", 4, virtual_stages=2)
    assert len(interleaved.stages) == 8 and interleaved.rank_of_piece("head") == 3
    assert interleaved.rank_cost(0) == pytest.approx(interleaved.stage_costs[0] + interleaved.stage_costs[4])


def test_too_many_stages_is_refused_in_one_line():
    with pytest.raises(ValueError, match="8 stages: the model has only 6 pieces") as err:
        plan_stages(model_pieces(dict(TINY, mtp_depth=1)), "dualpipev", 4)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="allowed: 1f1b"):
        plan_stages(model_pieces(TINY), "bogus", 2)
