import torch
import torch.nn.functional as F

from framework.model.args import ModelArgs
from framework.model.moe.layer import MoE


def _moe(**kw):
    args = dict(dim=16, num_experts=8, expert_dim=12, top_k=3, num_shared_experts=1, n_groups=2, topk_groups=2)
    args.update(kw)
    moe = MoE(ModelArgs(**args))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return moe


def _naive(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot: the definition the grouped path must reproduce."""
    r = moe.router(x_TD)
    e = moe.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(r.topk_idx_TK.shape[1]):
            i = r.topk_idx_TK[t, k]
            h = F.silu(x_TD[t] @ e.w1[i]) * (x_TD[t] @ e.w3[i])
            out[t] += r.topk_weights_TK[t, k] * (h @ e.w2[i])
    return out + moe.shared(x_TD)


def test_moe_matches_token_by_token_definition():
    moe = _moe()
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(2))
    out = moe(x)
    torch.testing.assert_close(out.view(20, 16), _naive(moe, x.view(20, 16)), rtol=1e-5, atol=1e-6)
    assert out.grad_fn is None or "AttachAuxLoss" not in type(out.grad_fn).__name__  # alpha defaults to 0


def test_moe_counts_tokens_per_expert_while_training_only():
    moe = _moe(top_k=2)
    x = torch.randn(3, 7, 16)
    moe(x)
    assert moe.tokens_per_expert.sum().item() == 3 * 7 * 2
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum().item() == 3 * 7 * 2


def test_moe_gradients_reach_router_experts_and_shared():
    moe = _moe(aux_loss_alpha=0.01)
    x = torch.randn(2, 10, 16, requires_grad=True)
    out = moe(x)  # the aux loss backpropagates through out (attach_aux_loss)
    out.pow(2).mean().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
