import torch

from parallel.token_dispatch import LocalDispatcher


def test_dispatch_then_combine_with_identity_experts_returns_the_input():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 16, generator=gen)
    idx = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(50)])
    weights = torch.full((50, 3), 1.0 / 3)
    d = LocalDispatcher()
    x_ND, counts, meta = d.dispatch(x, idx, 8)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()
    # Rows arrive grouped by expert, in expert order.
    assert torch.equal(idx.flatten()[meta.order_N], idx.flatten().sort(stable=True).values)
    torch.testing.assert_close(d.combine(x_ND, meta, weights), x)
