"""One pipeline stage's backward split in two (zero-bubble B and W): B computes the gradient of the
stage's input only; W, later, computes the weight gradients without going down the input's chain again.

How: the autograd graph below the stage output splits into the chain (every node that leads to the
stage input: what B runs) and weight branches (nodes that lead to a parameter only). A chain node with
an edge into a weight branch (a matmul's node: its input and its weight hang off it) is a *fork*. B runs
the chain with `autograd.grad(inputs=stage input)`, which computes no weight edge, and keeps each
fork's incoming gradient. W runs each fork again from that gradient, asking only for the gradients at
its weight edges (so the engine skips the fork's chain edges: nothing there leads to what is asked),
then runs the weight branches from those into the parameters' `.grad`. Forks that reach one another
run in separate engine calls, ordered in levels, so no call's roots lead into another root.

A custom autograd Function that computes several gradients in one backward (the grouped expert GEMM)
asks `input_gradient_wanted()` / `weight_gradient_wanted()`: its static `needs_input_grad` cannot
tell the two passes apart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

# Which pass of a split backward is running: "input" (B), "weight" (W's fork calls) or None. Not
# per thread: on CUDA the engine runs the backward on its device thread while the caller waits.
_running_pass: str | None = None


def input_gradient_wanted() -> bool:
    """False inside W's fork calls, where only weight gradients are asked for."""
    return _running_pass != "weight"


def weight_gradient_wanted() -> bool:
    """False inside B, which asks for the stage input's gradient only."""
    return _running_pass != "input"


@contextmanager
def _backward_pass(kind: str) -> Iterator[None]:
    global _running_pass
    previous, _running_pass = _running_pass, kind
    try:
        yield
    finally:
        _running_pass = previous


@dataclass
class _Fork:
    node: Node
    weight_edges: list[tuple[Node, int]]  # (first node of a weight branch, its input slot)
    grads: tuple[torch.Tensor | None, ...] | None = None  # the gradients that reached it in B


@dataclass
class PendingWeightGradients:
    """What B leaves for W. `output` keeps the graph alive (a custom Function's node is owned by
    the graph, not by our reference to it); without forks W runs the whole backward of `output`."""

    output: torch.Tensor
    grad_output: torch.Tensor | None
    levels: list[list[_Fork]] = field(default_factory=list)
    whole: bool = False  # the stage has no input gradient (the first stage): W is the whole backward


def backward_input(
    output: torch.Tensor, grad_output: torch.Tensor | None, stage_input: torch.Tensor | None
) -> tuple[torch.Tensor | None, PendingWeightGradients]:
    """B: -> (d output / d stage_input weighted by `grad_output` (None: `output` is the scalar loss),
    what W needs). A stage without an input gradient (the first) computes nothing here."""
    if stage_input is None:
        return None, PendingWeightGradients(output, grad_output, whole=True)
    levels = _fork_levels(output.grad_fn, get_gradient_edge(stage_input).node)
    if levels is None:  # a weight branch shared by two forks: no clean split, one whole backward
        torch.autograd.backward(output, grad_output)
        grad = stage_input.grad if stage_input.grad is not None else torch.zeros_like(stage_input)
        return grad, PendingWeightGradients(output, None)
    forks = [fork for level in levels for fork in level]
    handles = [fork.node.register_prehook(_keeper(fork)) for fork in forks]
    try:
        with _backward_pass("input"):
            (grad,) = torch.autograd.grad(output, stage_input, grad_output, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if grad is None:
        grad = torch.zeros_like(stage_input)
    return grad, PendingWeightGradients(output, grad_output, levels)


def backward_weight(pending: PendingWeightGradients) -> None:
    """W: accumulate the weight gradients B left into the parameters' `.grad` (FSDP2's unsharded
    ones inside a unit), running each fork once more for its weight edges, never the chain."""
    if pending.whole:
        torch.autograd.backward(pending.output, pending.grad_output)
        return
    branch_grads: dict[tuple[Node, int], torch.Tensor] = {}
    for level in pending.levels:
        roots, root_grads, asked = [], [], {}
        for fork in level:
            reached = [(slot, grad) for slot, grad in enumerate(fork.grads or ()) if grad is not None]
            fork.grads = None
            for slot, grad in reached:
                roots.append(GradientEdge(fork.node, slot))
                root_grads.append(grad)
            if reached:
                for edge in fork.weight_edges:
                    asked.setdefault(edge, GradientEdge(*edge))
        if not roots:
            continue
        with _backward_pass("weight"):
            grads = torch.autograd.grad(roots, list(asked.values()), root_grads, allow_unused=True)
        for edge, grad in zip(asked, grads, strict=True):
            if grad is not None:
                branch_grads[edge] = grad if edge not in branch_grads else branch_grads[edge] + grad
    if branch_grads:  # the weight branches: casts, views, and the parameters' AccumulateGrad
        torch.autograd.backward([GradientEdge(*edge) for edge in branch_grads], list(branch_grads.values()))
    pending.levels.clear()


def _keeper(fork: _Fork):
    def keep(grad_outputs):
        fork.grads = tuple(grad_outputs)

    return keep


def _fork_levels(root: Node | None, input_node: Node) -> list[list[_Fork]] | None:
    """The forks of the graph below `root`, in levels (a fork never reaches another of its level);
    None when a weight branch hangs below two nodes (W could not keep them apart)."""
    if root is None:
        return []
    children: dict[Node, list[tuple[Node, int]]] = {}
    parents: dict[Node, int] = defaultdict(int)
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        children[node] = [(child, slot) for child, slot in node.next_functions if child is not None]
        for child in {c for c, _ in children[node]}:
            parents[child] += 1
            if child not in seen:
                seen.add(child)
                stack.append(child)
    order, pending, ready = [], dict(parents), [root]  # topological: a node before its children
    while ready:
        node = ready.pop()
        order.append(node)
        for child in {c for c, _ in children[node]}:
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    on_chain: dict[Node, bool] = {}  # leads to the stage input
    to_weight: dict[Node, bool] = {}  # leads to a parameter
    for node in reversed(order):
        kids = children[node]
        on_chain[node] = node is input_node or any(on_chain[c] for c, _ in kids)
        is_param = node is not input_node and not kids and hasattr(node, "variable")
        to_weight[node] = is_param or any(to_weight[c] for c, _ in kids)
    depth: dict[Node, int] = defaultdict(int)  # forks above a chain node, at most
    levels: dict[int, list[_Fork]] = defaultdict(list)
    branch_forks: dict[Node, set[int]] = defaultdict(set)  # weight branch -> the levels of the forks above it
    branch_parents: dict[Node, int] = defaultdict(int)
    for node in order:
        if not on_chain[node]:
            continue
        weight_edges = [(c, slot) for c, slot in children[node] if not on_chain[c] and to_weight[c]]
        if weight_edges:
            levels[depth[node]].append(_Fork(node, weight_edges))
            for child in {c for c, _ in weight_edges}:
                branch_forks[child].add(depth[node])
                branch_parents[child] += 1
        for child, _ in children[node]:
            if on_chain[child]:
                depth[child] = max(depth[child], depth[node] + bool(weight_edges))
    # A branch below forks of one level only (a per-expert loop's unbind of its weight) is asked for
    # in that level's one call; below anything else, the chain would lead into it from another call.
    if any(len(branch_forks[c]) > 1 or branch_parents[c] != parents[c] for c in branch_forks):
        return None
    return [levels[d] for d in sorted(levels)]
