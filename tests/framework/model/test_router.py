import pytest
import torch

from framework.model.args import ModelArgs
from framework.model.moe.router import Router, sequence_aux_loss


def _router(**kw):
    args = dict(dim=16, num_experts=8, top_k=2)
    args.update(kw)
    router = Router(ModelArgs(**args))
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    return router


def _tokens(n=64):
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(1))


def test_topk_picks_highest_affinities_and_normalises_sigmoid_gates():
    router = _router(route_scale=2.5)
    x = _tokens()
    r = router(x)
    scores = torch.sigmoid(x @ router.weight.T)
    expected = scores.topk(2, dim=-1).indices
    assert torch.equal(r.topk_idx_TK.sort(-1).values, expected.sort(-1).values)
    torch.testing.assert_close(r.topk_weights_TK.sum(-1), torch.full((64,), 2.5))


def test_softmax_gates_are_the_raw_probabilities():
    router = _router(score_func="softmax")
    x = _tokens()
    r = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    torch.testing.assert_close(r.topk_weights_TK, probs.gather(1, r.topk_idx_TK))


def test_group_limit_keeps_every_token_within_topk_groups():
    router = _router(num_experts=16, top_k=4, n_groups=4, topk_groups=2)
    r = router(_tokens(256))
    groups = r.topk_idx_TK // 4
    distinct = torch.tensor([len(set(row.tolist())) for row in groups])
    assert distinct.max() <= 2
    # Without the limit, some tokens would spread over more groups.
    free = _router(num_experts=16, top_k=4)(_tokens(256)).topk_idx_TK // 4
    assert max(len(set(row.tolist())) for row in free) > 2


def test_bias_changes_selection_but_not_gate_values():
    router = _router()
    x = _tokens()
    before = router(x)
    router.expert_bias[3] = 10.0  # expert 3 now always selected
    after = router(x)
    assert (after.topk_idx_TK == 3).any(dim=-1).all()
    scores = torch.sigmoid(x @ router.weight.T)
    raw = scores.gather(1, after.topk_idx_TK)
    torch.testing.assert_close(after.topk_weights_TK, raw / raw.sum(-1, keepdim=True))
    assert not torch.equal(before.topk_idx_TK, after.topk_idx_TK)


def test_bias_update_moves_against_the_load():
    router = _router(num_experts=4)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])  # mean 5
    router.update_bias(load, speed=0.01)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    router.update_bias(torch.full((4,), 5.0), speed=0.01)  # balanced: no change
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_bias_update_balances_a_skewed_router():
    router = _router(num_experts=8, top_k=2)
    with torch.no_grad():
        router.weight[0] += 10.0  # expert 0 takes almost every token
    x = _tokens(512)

    def imbalance():
        counts = torch.bincount(router(x).topk_idx_TK.flatten(), minlength=8).float()
        return counts.max() / counts.mean()

    start = imbalance()
    for _ in range(300):
        counts = torch.bincount(router(x).topk_idx_TK.flatten(), minlength=8).float()
        router.update_bias(counts, speed=0.01)
    end = imbalance()
    assert start > 1.5
    assert end < 1.2


def test_sequence_aux_loss_is_minimal_when_balanced_and_has_gradient():
    router = _router()
    x = _tokens(64)
    r = router(x)
    loss = sequence_aux_loss(r, batch=4, alpha=0.1)
    loss.backward()
    assert loss.item() > 0 and router.weight.grad.abs().sum() > 0
    # Perfectly uniform affinities and load give alpha * 1 exactly.
    from framework.model.moe.router import Routing

    uniform = Routing(
        topk_idx_TK=torch.arange(8).repeat(8).view(32, 2),
        topk_weights_TK=torch.full((32, 2), 0.5),
        scores_TE=torch.full((32, 8), 0.3),
    )
    torch.testing.assert_close(sequence_aux_loss(uniform, batch=2, alpha=0.1), torch.tensor(0.1))


def test_router_rejects_an_unknown_score_func():
    with pytest.raises(ValueError, match="score_func='relu': allowed: sigmoid, softmax"):
        Router(ModelArgs(score_func="relu"))
