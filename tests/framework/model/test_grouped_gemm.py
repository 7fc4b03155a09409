import pytest
import torch

from framework.model.moe.grouped_gemm import grouped_mm, grouped_mm_supported, looped_mm


def _problem(counts, dim=24, hidden=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), dim, generator=gen, requires_grad=True)
    w = torch.randn(len(counts), dim, hidden, generator=gen, requires_grad=True)
    offsets = torch.cumsum(torch.tensor(counts), 0)
    return x, w, offsets


def test_grouped_mm_is_available_on_cpu_fp32():
    assert grouped_mm_supported("cpu", torch.float32)


@pytest.mark.parametrize("counts", [[5, 0, 17, 3], [0, 0, 9, 0], [1, 1, 1, 1], [33, 7, 0, 12, 2, 0, 0, 8]])
def test_grouped_mm_matches_loop_exactly_forward_and_backward(counts):
    x, w, offsets = _problem(counts)
    grad_out = torch.randn(sum(counts), w.shape[-1], generator=torch.Generator().manual_seed(1))

    y = grouped_mm(x, w, offsets)
    (y * grad_out).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None

    y_ref = looped_mm(x, w, offsets)
    (y_ref * grad_out).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-6, atol=1e-6)
    # An expert that got no tokens gets an exactly zero gradient.
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(gw[e]) == 0


def test_grouped_mm_backward_accepts_expanded_gradients():
    """`.sum()` produces a stride-0 gradient that torch's own _grouped_mm backward rejects."""
    x, w, offsets = _problem([4, 4])
    grouped_mm(x, w, offsets).sum().backward()
    assert x.grad is not None and w.grad is not None


def test_grouped_mm_bf16_close_to_fp32():
    x, w, offsets = _problem([8, 3, 21])
    y32 = looped_mm(x.detach(), w.detach(), offsets)
    y16 = grouped_mm(x.detach().bfloat16(), w.detach().bfloat16(), offsets)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=1e-1)


def test_sizes_the_kernel_rejects_fall_back_to_the_loop():
    """Row strides that are not a multiple of 16 bytes (here 6 fp32 = 24 bytes)."""
    x, w, offsets = _problem([3, 5], dim=12, hidden=6)
    y = grouped_mm(x, w, offsets)
    y.sum().backward()
    torch.testing.assert_close(y, looped_mm(x, w, offsets))
