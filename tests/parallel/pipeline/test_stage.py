"""The stage cut keeps each parameter under its own name, and the ranks together hold the model."""

import pytest
import torch

from framework.model.transformer import ModelArgs, MoETransformer
from parallel.pipeline import PIPELINE_SCHEDULES, model_pieces, mtp_needs_embedding, plan_stages
from parallel.pipeline.stage import keep_pieces, mirror_rank, rank_stage_pieces

ARGS = ModelArgs(
    dim=32, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=16, ffn_dim=48, num_experts=8,
    num_shared_experts=1, top_k=2, expert_dim=16, first_k_dense=1, mtp_depth=1,
)  # fmt: skip


def meta_model() -> MoETransformer:
    with torch.device("meta"):
        return MoETransformer(ARGS)


@pytest.mark.parametrize("schedule", PIPELINE_SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4])
def test_stages_keep_names_and_cover_the_model(schedule, pp):
    full = {name for name, _ in meta_model().named_parameters()}
    plan = plan_stages(model_pieces(ARGS), schedule, pp)
    held: set[str] = set()
    for rank in range(pp):
        stage = meta_model()
        pieces = frozenset().union(*rank_stage_pieces(plan, rank).values())
        keep_pieces(stage, pieces)
        names = {name for name, _ in stage.named_parameters()}
        assert names <= full  # same names as in the whole model
        assert ("embed.weight" in names) == ("embed" in pieces or ("head" in pieces and mtp_needs_embedding(plan)))
        assert any(n.startswith("mtp.") for n in names) == ("head" in pieces)
        held |= names
    assert held == full


@pytest.mark.parametrize("pp", [2, 4])
def test_dualpipe_mirror_ranks_hold_the_same_pieces_and_the_embedding_with_the_head(pp):
    plan = plan_stages(model_pieces(ARGS), "dualpipe", pp)
    assert [mirror_rank(plan, r) for r in range(pp)] == list(reversed(range(pp)))
    for rank in range(pp):
        assert rank_stage_pieces(plan, rank) == rank_stage_pieces(plan, pp - 1 - rank)
        assert sorted(rank_stage_pieces(plan, rank)) == sorted({rank, pp - 1 - rank})
    assert not mtp_needs_embedding(plan)  # the head's rank holds the other copy's embedding
    assert mirror_rank(plan_stages(model_pieces(ARGS), "dualpipev", pp), 0) is None


def test_a_dualpipev_stage_runs_its_pieces_only():
    model = meta_model().to_empty(device="cpu")
    model.init_weights(0)
    tokens_BS = torch.randint(0, ARGS.vocab_size, (2, ARGS.seq_len))
    plan = plan_stages(model_pieces(ARGS), "dualpipev", 2)
    stages = plan.stages
    h = None
    for pieces in stages:  # stage by stage through the V equals the whole model
        h = model(tokens_BS, h, frozenset(pieces))
    whole = model(tokens_BS)
    assert len(h) == len(whole) == 2
    for a, b in zip(h, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
