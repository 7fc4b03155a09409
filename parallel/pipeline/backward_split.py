"""One pipeline stage's backward split in two (zero-bubble B and W): B computes the gradient of the
stage's input only; W, later, computes the weight gradients without going down the input's chain again.

How: the autograd graph below the stage output splits into the chain (every node that leads to the
stage input: what B runs) and weight branches (nodes that lead to a parameter only). A chain node with
an edge into a weight branch (a matmul's node: its input and its weight hang off it) is a *fork*. B runs
the chain with `autograd.grad(inputs=stage input and the forks' incoming edges)`, which computes no
weight edge and hands over each fork's incoming gradient on the way; then it frees what the chain's
other nodes saved (W never runs them), so between B and W the graph holds only the forks' and
branches' tensors. W runs each fork again from that gradient, asking only for the parameters below its
weight edges (so the engine skips the fork's chain edges: nothing there leads to what is asked): the
branches run into the parameters' `.grad` within that call, as in one whole backward (no copy). Forks
that reach one another run in separate engine calls, ordered in levels, so no call's roots lead into
another root; a parameter below two levels' branches (a weight used at two depths) makes those levels
hand their branch gradients back instead, accumulated in one call at W's end. Finding the forks is
cached by the graph's structure, which the micro-batches of a stage share (`_fork_levels`).

What the split costs over one whole backward (scripts/bench_backward_split.py; README): per micro-batch
of a stage of two MoE blocks on CPU, the walk of the graph (0.4 ms) and the release of B's tensors
(0.6 ms), one engine call per level (23 for that stage, each walking the graph below its forks: 1.1 ms
in all), the forks' nodes applied twice, and W's kernels reading gradients that left the cache long
ago; (B + W) / BW 1.25 at dim 128, 1.10 at dim 512.

A custom autograd Function that computes several gradients in one backward (the grouped expert GEMM)
asks `input_gradient_wanted()` / `weight_gradient_wanted()`: its static `needs_input_grad` cannot
tell the two passes apart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.autograd.graph import GradientEdge, Node, _engine_run_backward, get_gradient_edge

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
    in_slots: tuple[int, ...]  # its input slots that an edge of the graph leads into
    grads: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (slot, what reached it in B)


@dataclass
class _Level:
    """Forks that never reach one another, run by one engine call in W. `leaves`: the gradient
    accumulators (the parameters) below the level's weight branches, which no other level reaches;
    None where one does (a weight used at two depths): then the call hands the branches' gradients
    back and W accumulates them at its end, in one call for all such levels."""

    forks: list[_Fork]
    leaves: tuple[GradientEdge, ...] | None


@dataclass
class PendingWeightGradients:
    """What B leaves for W. `output` keeps the graph alive (a custom Function's node is owned by
    the graph, not by our reference to it); without forks W runs the whole backward of `output`."""

    output: torch.Tensor
    grad_output: torch.Tensor | None
    levels: list[_Level] = field(default_factory=list)
    whole: bool = False  # the stage has no input gradient (the first stage): W is the whole backward


def backward_input(
    output: torch.Tensor, grad_output: torch.Tensor | None, stage_input: torch.Tensor | None
) -> tuple[torch.Tensor | None, PendingWeightGradients]:
    """B: -> (d output / d stage_input weighted by `grad_output` (None: `output` is the scalar loss),
    what W needs). A stage without an input gradient (the first) computes nothing here."""
    if stage_input is None:
        return None, PendingWeightGradients(output, grad_output, whole=True)
    split = _fork_levels(get_gradient_edge(output), get_gradient_edge(stage_input).node)
    if split is None:  # a weight branch shared by two forks: no clean split, one whole backward
        torch.autograd.backward(output, grad_output)
        grad = stage_input.grad if stage_input.grad is not None else torch.zeros_like(stage_input)
        return grad, PendingWeightGradients(output, None)
    # The engine hands over the gradient reaching each fork as it runs the fork (asked-for edges on
    # the way to the input cost nothing more than the run itself: no hooks, no second pass).
    levels, chain_only = split
    forks = [(fork, slot) for level in levels for fork in level.forks for slot in fork.in_slots]
    asked = [stage_input, *(GradientEdge(fork.node, slot) for fork, slot in forks)]
    with _backward_pass("input"):
        grad, *reached = torch.autograd.grad(output, asked, grad_output, retain_graph=True, allow_unused=True)
    for (fork, slot), fork_grad in zip(forks, reached, strict=True):
        if fork_grad is not None:
            fork.grads.append((slot, fork_grad))
    _release_saved_tensors(chain_only)
    if grad is None:
        grad = torch.zeros_like(stage_input)
    return grad, PendingWeightGradients(output, None, levels)


def backward_weight(pending: PendingWeightGradients) -> None:
    """W: accumulate the weight gradients B left into the parameters' `.grad` (FSDP2's unsharded
    ones inside a unit), running each fork once more for its weight edges, never the chain."""
    if pending.whole:
        torch.autograd.backward(pending.output, pending.grad_output)
        return
    branch_grads: dict[tuple[Node, int], torch.Tensor] = {}
    with _backward_pass("weight"):
        for level in pending.levels:
            roots, root_grads = [], []
            for fork in level.forks:
                for slot, grad in fork.grads:
                    roots.append(GradientEdge(fork.node, slot))
                    root_grads.append(grad)
                fork.grads = []
            if not roots:
                continue
            if level.leaves is not None:  # the branches run into the parameters within the call
                _run_engine(roots, root_grads, level.leaves, accumulate=True)
                continue
            asked = dict.fromkeys(edge for fork in level.forks for edge in fork.weight_edges)
            grads = _run_engine(roots, root_grads, tuple(GradientEdge(*edge) for edge in asked), accumulate=False)
            for edge, grad in zip(asked, grads, strict=True):
                if grad is not None:
                    branch_grads[edge] = grad if edge not in branch_grads else branch_grads[edge] + grad
    if branch_grads:  # the weight branches of levels that share a parameter with another level
        _run_engine([GradientEdge(*edge) for edge in branch_grads], list(branch_grads.values()), (), accumulate=True)
    pending.levels.clear()


def _run_engine(
    roots: list[GradientEdge], grads: list[torch.Tensor], inputs: tuple[GradientEdge, ...], accumulate: bool
) -> tuple[torch.Tensor | None, ...]:
    """One engine call from `roots` (the graph kept for nothing after it): into the `.grad` of the
    parameters whose accumulators `inputs` are (accumulate), or -> the gradients at `inputs`. What
    `torch.autograd.grad` / `backward` do minus their checks of `grads` against the roots' shapes
    (Python work, ~50 us a call): every gradient here came out of the engine for that very edge, in
    B or an earlier level."""
    return _engine_run_backward(tuple(roots), tuple(grads), False, False, inputs, True, accumulate)


# A fork as the analysis leaves it: (its position in the walk, its weight edges as (position, slot),
# its input slots that edges lead into); a level: (its forks, the positions of the parameters'
# accumulators below its branches, or None where another level reaches one of them too).
_ForkPlan = tuple[int, tuple[tuple[int, int], ...], tuple[int, ...]]
_LevelPlan = tuple[tuple[_ForkPlan, ...], tuple[int, ...] | None]


def _fork_levels(output: GradientEdge, input_node: Node) -> tuple[list[_Level], list[Node]] | None:
    """-> (the forks of the graph below `output`, in levels (a fork never reaches another of its
    level); the other nodes of the input's chain, which W never runs); None when a weight branch
    hangs below two nodes (W could not keep them apart).

    The analysis is a function of the graph's structure alone (`_walk`'s signature: every node's
    type and edges, and where the input is), so it is cached by that signature: the micro-batches
    of a stage share one structure, and a graph that differs anywhere (another stage, a last
    micro-batch of another shape, a different routing graph) has another signature and its own
    analysis. A hit costs the walk only, a fifth of the analysis."""
    if output.node is None:
        return [], []
    nodes, signature = _walk(output, input_node)
    plan = _plan(signature)
    if plan is None:
        return None
    level_plans, chain_only = plan
    return [
        _Level(
            [
                _Fork(nodes[fork], [(nodes[child], slot) for child, slot in edges], slots)
                for fork, edges, slots in forks
            ],
            None if leaves is None else tuple(GradientEdge(nodes[leaf], 0) for leaf in leaves),
        )
        for forks, leaves in level_plans
    ], [nodes[node] for node in chain_only]


# Per node type, the attributes that hold its saved tensors (a SavedTensor, or a list of them).
_SAVED_ATTRIBUTES: dict[type, tuple[str, ...]] = {}


def _dropped(_: torch.Tensor) -> None:
    return None


def _released(_: None) -> torch.Tensor:
    raise RuntimeError("backward_split: W unpacked a tensor saved for B only (released after B)")


def _drop(saved: torch._C._autograd.SavedTensor) -> None:
    """Pack (so drop) a saved tensor now. One that saved-tensor hooks of someone else's already
    packed (torch.autograd.graph.saved_tensors_hooks around the forward: offloading, a memory
    probe) stays theirs: kept until W, as without the release."""
    try:
        saved.register_hooks(_dropped, _released)
    except RuntimeError as error:
        if "hooks have already been set" not in str(error):
            raise


def _release_saved_tensors(nodes: list[Node]) -> None:
    """Free what the nodes that only B runs saved for their backward (attention's inputs and
    outputs, activations' inputs ...), instead of holding it until W with the rest of the graph.
    A tensor that saved-tensor hooks packed into an object with a `release()` (an activation-
    checkpointed block's slot, which B's rerun filled) is released through it."""
    for node in nodes:
        kind = type(node)
        attributes = _SAVED_ATTRIBUTES.get(kind)
        if attributes is None:
            attributes = _SAVED_ATTRIBUTES[kind] = tuple(a for a in dir(kind) if a.startswith("_raw_saved_"))
        for attribute in attributes:
            saved = getattr(node, attribute)
            for one in saved if isinstance(saved, (list, tuple)) else (saved,):
                try:
                    packed = None if one is None else one.data  # the tensor, or what hooks packed it into
                except RuntimeError:  # changed in place since it was saved (a node B ran without it): kept
                    continue
                if isinstance(packed, torch.Tensor):
                    if packed.dim() > 0:  # a 0-dim one (a Python scalar's) frees nothing
                        _drop(one)
                elif packed is not None and hasattr(packed, "release"):
                    packed.release()


def _walk(output: GradientEdge, input_node: Node) -> tuple[list[Node], tuple]:
    """-> (the nodes below `output`, breadth-first from it; the graph's structure by their positions:
    (the input's position or -1, the output's slot, per node (its type, its edges as flat (child
    position or -1, slot))))."""
    root = output.node
    position, nodes, shape = {root: 0}, [root], []
    for node in nodes:  # grows while it runs
        edges = []
        for child, slot in node.next_functions:
            if child is None:
                edges += (-1, slot)
                continue
            at = position.get(child)
            if at is None:
                at = position[child] = len(nodes)
                nodes.append(child)
            edges += (at, slot)
        shape.append((type(node), tuple(edges)))
    return nodes, (position.get(input_node, -1), output.output_nr, tuple(shape))


@lru_cache(maxsize=64)
def _plan(signature: tuple) -> tuple[tuple[_LevelPlan, ...], tuple[int, ...]] | None:
    """The fork levels of the graph that `signature` describes (see `_walk`), by node positions."""
    input_at, output_slot, shape = signature
    children = [[(edges[i], edges[i + 1]) for i in range(0, len(edges), 2) if edges[i] >= 0] for _, edges in shape]
    is_leaf_param = [not kids and hasattr(kind, "variable") for (kind, _), kids in zip(shape, children, strict=True)]
    parents = [0] * len(shape)
    in_slots: list[set[int]] = [set() for _ in shape]  # where gradients can arrive: edges, and the output's
    in_slots[0].add(output_slot)
    for kids in children:
        for child, slot in kids:
            in_slots[child].add(slot)
        for child in {c for c, _ in kids}:
            parents[child] += 1
    order, pending, ready = [], list(parents), [0]  # topological: a node before its children
    while ready:
        node = ready.pop()
        order.append(node)
        for child in {c for c, _ in children[node]}:
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    on_chain = [False] * len(shape)  # leads to the stage input
    to_weight = [False] * len(shape)  # leads to a parameter
    for node in reversed(order):
        kids = children[node]
        on_chain[node] = node == input_at or any(on_chain[c] for c, _ in kids)
        to_weight[node] = (node != input_at and is_leaf_param[node]) or any(to_weight[c] for c, _ in kids)
    depth = [0] * len(shape)  # forks above a chain node, at most
    levels: dict[int, list[_ForkPlan]] = defaultdict(list)
    branch_forks: dict[int, set[int]] = defaultdict(set)  # weight branch -> the levels of the forks above it
    branch_parents: dict[int, int] = defaultdict(int)
    for node in order:
        if not on_chain[node]:
            continue
        weight_edges = tuple((c, slot) for c, slot in children[node] if not on_chain[c] and to_weight[c])
        if weight_edges:
            levels[depth[node]].append((node, weight_edges, tuple(sorted(in_slots[node]))))
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
    # The parameters below each level's branches. A level whose parameters no other level reaches
    # runs its branches into them in its own call: asking for them leads the engine down no chain.
    leaf_levels: dict[int, set[int]] = defaultdict(set)  # a parameter's accumulator -> the levels above it
    for branch, (depth_of_forks,) in branch_forks.items():  # one level per branch (checked above)
        below, seen = [branch], {branch}
        while below:
            node = below.pop()
            if is_leaf_param[node]:
                leaf_levels[node].add(depth_of_forks)
            for child, _ in children[node]:
                if child not in seen:
                    seen.add(child)
                    below.append(child)
    leaves: dict[int, list[int]] = defaultdict(list)
    for leaf, at in sorted(leaf_levels.items()):
        for d in at:
            leaves[d].append(leaf)
    shared = {d for at in leaf_levels.values() if len(at) > 1 for d in at}
    forks = {fork for level in levels.values() for fork, _, _ in level}
    chain_only = tuple(node for node in order if on_chain[node] and node not in forks and node != input_at)
    return tuple((tuple(levels[d]), None if d in shared else tuple(leaves[d])) for d in sorted(levels)), chain_only
