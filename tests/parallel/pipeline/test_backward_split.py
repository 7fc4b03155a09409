"""B then W on a real MoE block gives the gradients of one whole backward, and W redoes none of B's
work: no matmul runs twice, no block is recomputed twice (activation checkpointing full/selective)."""

from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from framework.config import Config
from framework.model.args import ModelArgs
from framework.model.moe.layer import MoE
from framework.model.transformer import MoETransformer
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.pipeline.backward_split import backward_input, backward_weight
from tests.parallel.harness import PARITY_MODEL, graph_nodes, saved_storages

MATMULS = {"mm", "addmm", "bmm", "_grouped_mm"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def moe_block(mode: str):
    """The first MoE block of the parity model (shared expert, group-limited routing, aux loss)."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(PARITY_MODEL))
    model = MoETransformer(ModelArgs.from_config(cfg.model))
    model.init_weights(0)
    block = model.layers["1"]
    assert isinstance(block.ffn, MoE)
    apply_activation_checkpointing([block], mode)
    return block, model.rope_cos, model.rope_sin


def _run(block, cos, sin, h, grad, split: bool):
    """-> (input gradient, weight gradients, op counts in the backward's parts, router reruns)."""
    block.zero_grad(set_to_none=True)
    routes = []
    handle = block.ffn.router.register_forward_hook(lambda *_: routes.append(1))
    h_in = h.detach().requires_grad_()
    out = block(h_in, cos, sin)
    routes.clear()
    counts = []
    if split:
        with _CountOps() as ops:
            h_grad, pending = backward_input(out, grad, h_in)
        counts.append((ops.ops, len(routes)))
        assert all(p.grad is None for p in block.parameters()), "B computed a weight gradient"
        with _CountOps() as ops:
            backward_weight(pending)
        counts.append((ops.ops, len(routes) - counts[0][1]))
    else:
        with _CountOps() as ops:
            out.backward(grad)
        h_grad = h_in.grad
        counts.append((ops.ops, len(routes)))
    handle.remove()
    return h_grad, {n: p.grad.clone() for n, p in block.named_parameters()}, counts


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_b_then_w_equals_one_backward_and_w_redoes_nothing(mode):
    block, cos, sin = moe_block(mode)
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    ref_h, ref_w, [(whole_ops, whole_reruns)] = _run(block, cos, sin, h, grad, split=False)
    got_h, got_w, [(b_ops, b_reruns), (w_ops, w_reruns)] = _run(block, cos, sin, h, grad, split=True)

    torch.testing.assert_close(got_h, ref_h, rtol=1e-6, atol=1e-7)
    assert got_w.keys() == ref_w.keys()
    for name, ref in ref_w.items():
        torch.testing.assert_close(got_w[name], ref, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # Every matmul of the whole backward runs exactly once across B and W: B the input-gradient
    # ones (and the checkpointed block's rerun), W the weight-gradient ones and nothing else.
    for op in MATMULS:
        assert b_ops[op] + w_ops[op] == whole_ops[op], (op, b_ops[op], w_ops[op], whole_ops[op])
    # Nor any other op that touches data (views and detaches aside): W's gradients reach the
    # parameters' .grad as the whole backward's do, without a copy.
    for op in (whole_ops.keys() | b_ops.keys() | w_ops.keys()) - {"view", "detach"}:
        assert b_ops[op] + w_ops[op] == whole_ops[op], (op, b_ops[op], w_ops[op], whole_ops[op])
    assert sum(w_ops[op] for op in MATMULS) >= 11  # attention 4, router 1, experts 3, shared expert 3
    attention = "_scaled_dot_product_flash_attention_for_cpu_backward"  # on the chain only: in B, never in W
    assert (b_ops[attention], w_ops[attention]) == (whole_ops[attention], 0) and whole_ops[attention] > 0
    # The checkpointed block reruns once, in B; W reuses what that rerun saved.
    assert (whole_reruns, b_reruns, w_reruns) == ((1, 1, 0) if mode != "none" else (0, 0, 0))


@pytest.mark.parametrize("mode", ["none", "full"])
def test_between_b_and_w_the_graph_holds_only_what_w_needs(mode):
    """B frees what only it needed (attention's tensors, activations' inputs; a checkpointed
    block's recomputed ones): the graph keeps the forks' and weight branches' saved tensors."""
    block, cos, sin = moe_block(mode)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    h_in = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = block(h_in, cos, sin)
    graph = graph_nodes([out.grad_fn])
    forward = saved_storages(graph, params) if mode == "none" else None  # (unpacking would rerun a checkpointed block)
    _, pending = backward_input(out, torch.ones_like(out), h_in)
    forks = [fork for level in pending.levels for fork in level.forks]
    branches = graph_nodes([node for fork in forks for node, _ in fork.weight_edges])
    held = saved_storages(graph, params)
    assert held == saved_storages([*(fork.node for fork in forks), *branches], params) and held
    if forward is not None:
        assert sum(held.values()) < 0.6 * sum(forward.values())
    backward_weight(pending)
    assert all(p.grad is not None for p in block.parameters())


def test_first_stage_b_computes_nothing_and_w_everything():
    block, cos, sin = moe_block("none")
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = block(h * 1.0, cos, sin)  # the stage's input does not require grad here: its "input" is h's producer
    grad, pending = backward_input(out, torch.ones_like(out), None)
    assert grad is None and all(p.grad is None for p in block.parameters())
    backward_weight(pending)
    assert all(p.grad is not None for p in block.parameters()) and h.grad is not None


def _per_expert_stage(h, weight, norm, expert_of_token, experts: int):
    """A stage in the style of a per-expert loop (an expert without tokens runs nothing), so the
    autograd graph's structure follows the routing: a norm weight, then one matmul per busy expert."""
    x = h * norm
    out = torch.zeros_like(x)
    for e, w in enumerate(weight.unbind(0)[:experts]):
        rows = (expert_of_token == e).nonzero().squeeze(1)
        if rows.numel():
            out = out.index_add(0, rows, x[rows] @ w)
    return out.tanh().sum()


def _split_against_whole(params, routing, seed: int) -> None:
    """B then W on `_per_expert_stage` gives the whole backward's gradients, exactly."""
    h = torch.randn(len(routing), 8, generator=torch.Generator().manual_seed(seed))
    grads = []
    for split in (False, True):
        for p in params:
            p.grad = None
        h_in = h.clone().requires_grad_()
        loss = _per_expert_stage(h_in, *params, routing, experts=4)
        if split:
            h_grad, pending = backward_input(loss, None, h_in)
            backward_weight(pending)
        else:
            loss.backward()
            h_grad = h_in.grad
        grads.append([h_grad, *(p.grad for p in params)])
    for got, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_graph_analysis_is_cached_by_structure_and_redone_when_it_differs():
    from parallel.pipeline.backward_split import _plan

    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(4, 8, 8, generator=gen).requires_grad_(), torch.randn(8, generator=gen).requires_grad_()]
    all_busy = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    _plan.cache_clear()
    _split_against_whole(params, all_busy, seed=0)
    assert (_plan.cache_info().hits, _plan.cache_info().misses) == (0, 1)
    # Another micro-batch: other tokens, other values, the same graph structure: the analysis is reused.
    _split_against_whole(params, torch.tensor([3, 2, 1, 0, 3, 2, 1, 0]), seed=1)
    assert (_plan.cache_info().hits, _plan.cache_info().misses) == (1, 1)
    # Other tokens per expert (expert 2 gets none, so its matmul is not in the graph): another
    # structure, analysed afresh; a last micro-batch with fewer tokens but every expert busy has the
    # same structure (other shapes only: the analysis does not depend on them) and reuses it.
    _split_against_whole(params, torch.tensor([0, 1, 1, 3, 0, 1, 3, 3]), seed=2)
    assert (_plan.cache_info().hits, _plan.cache_info().misses) == (1, 2)
    _split_against_whole(params, torch.tensor([0, 1, 2, 3, 0, 1]), seed=3)
    _split_against_whole(params, torch.tensor([0, 0, 0, 0]), seed=4)  # one expert only: another structure
    assert (_plan.cache_info().hits, _plan.cache_info().misses) == (2, 3)
    # Each cached analysis is found again by its own structure only.
    _split_against_whole(params, torch.tensor([1, 1, 0, 3, 0, 1, 3, 3]), seed=5)
    _split_against_whole(params, all_busy, seed=6)
    _split_against_whole(params, torch.tensor([0, 0]), seed=7)
    assert (_plan.cache_info().hits, _plan.cache_info().misses) == (5, 3)
    # One busy expert again, but another one: the same nodes, one edge elsewhere (the unbind's slot).
    _split_against_whole(params, torch.tensor([2, 2]), seed=8)
    assert (_plan.cache_info().hits, _plan.cache_info().misses) == (5, 4)


def _b_then_w_equals_one_backward_bitwise(seed: int, forward, check_split=None) -> None:
    """`forward(h_in, w, norm)` on a small chain with an [8, 8] weight and a norm weight: B then W
    gives bit for bit one backward's input and weight gradients, and B computes no weight gradient.
    `check_split(out, h_in)` runs on the split's graph before B."""
    gen = torch.Generator().manual_seed(seed)
    w, norm = torch.randn(8, 8, generator=gen, requires_grad=True), torch.randn(8, generator=gen, requires_grad=True)
    h, grad = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    results = []
    for split in (False, True):
        w.grad = norm.grad = None
        h_in = h.clone().requires_grad_()
        out = forward(h_in, w, norm)
        if split:
            if check_split is not None:
                check_split(out, h_in)
            h_grad, pending = backward_input(out, grad, h_in)
            assert w.grad is None and norm.grad is None
            backward_weight(pending)
        else:
            out.backward(grad)
            h_grad = h_in.grad
        results.append([h_grad, w.grad, norm.grad])
    for got, ref in zip(*reversed(results), strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_a_stage_output_straight_out_of_a_matmul_keeps_its_weight_gradient():
    """The output's own node is a fork: what reaches it (the output's gradient) is kept for W too."""
    _b_then_w_equals_one_backward_bitwise(3, lambda h_in, w, norm: (h_in * norm) @ w)


def test_a_weight_used_at_two_depths_gets_both_gradients():
    """`w` is used by a matmul near the output and by one further down the chain (two forks of
    different levels, each through its own transpose): those levels hand their branch gradients
    back and W accumulates them at its end; the norm weight's level runs into its parameter."""
    from torch.autograd.graph import get_gradient_edge

    from parallel.pipeline.backward_split import _fork_levels

    def three_levels(out, h_in) -> None:
        levels, _ = _fork_levels(get_gradient_edge(out), get_gradient_edge(h_in).node)
        assert [level.leaves is None for level in levels] == [True, True, False]

    linear = torch.nn.functional.linear
    _b_then_w_equals_one_backward_bitwise(
        4, lambda h_in, w, norm: linear(torch.tanh(linear(h_in * norm, w)), w), three_levels
    )


def test_tensors_packed_by_other_saved_tensor_hooks_are_kept_not_an_error():
    """A forward under saved_tensors_hooks (offloading, a memory probe: tests/parallel/test_plan.py)
    packs its saved tensors itself; B's release leaves those alone and W still gets them."""
    block, cos, sin = moe_block("none")
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    ref_h, ref_w, _ = _run(block, cos, sin, h, grad, split=False)
    block.zero_grad(set_to_none=True)
    h_in = h.detach().requires_grad_()
    unpacked = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: unpacked.append(1) or t):
        out = block(h_in, cos, sin)
    h_grad, pending = backward_input(out, grad, h_in)
    backward_weight(pending)
    assert unpacked, "the hooks did not pack the block's saved tensors"
    torch.testing.assert_close(h_grad, ref_h, rtol=1e-6, atol=1e-7)
    for name, param in block.named_parameters():
        torch.testing.assert_close(param.grad, ref_w[name], rtol=1e-6, atol=1e-7)
