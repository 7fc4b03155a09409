"""The memory and communication plan of a layout: bytes each rank holds and sends per step,
in pure Python from the model config, counting and sharding tensors as framework/ and parallel/ do."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from parallel.layout import Layout
from parallel.pipeline.actions import Kind, PipelineSchedule
from parallel.pipeline.schedules import build_schedule
from parallel.pipeline.stage_cut import StagePlan, model_pieces, mtp_needs_embedding, plan_stages

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
FP32 = 4  # master weights, gradients, AdamW state, reductions, what stays fp32 in compute, and the
# pipeline's messages (parallel/pipeline/runtime.py WIRE_DTYPE)
INT64 = 8  # token ids and routing indices that autograd keeps
# The FSDP units of parallel/fsdp.py that are not blocks: the root (final norm, head) stays gathered
# from forward to backward; the embedding is gathered for each forward call only (never in backward).
ROOT, EMBED = "root", "embed"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as MoETransformer.named_parameters() names it."""

    name: str
    shape: tuple[int, ...]
    unit: str  # the FSDP unit that shards it: "embed", "root", "layers.3", "layers.3.ffn.experts", "mtp.0", ...
    expert: bool  # [E, ...] routed-expert stack: EP-sharded, then FSDP over expert data parallel
    fp32_compute: bool  # stays fp32 under bf16 (embedding, head, final norm, routers)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _block_params(m, prefix: str, unit: str, moe: bool) -> list[ParamSpec]:
    head_dim = m.dim // m.n_heads
    q, kv = m.n_heads * head_dim, m.n_kv_heads * head_dim
    dense = [
        (f"{prefix}.attn_norm.weight", (m.dim,)),
        (f"{prefix}.attn.wq.weight", (q, m.dim)),
        (f"{prefix}.attn.wk.weight", (kv, m.dim)),
        (f"{prefix}.attn.wv.weight", (kv, m.dim)),
        (f"{prefix}.attn.wo.weight", (m.dim, q)),
        (f"{prefix}.ffn_norm.weight", (m.dim,)),
    ]
    if not moe:
        ffn = [
            (f"{prefix}.ffn.w1.weight", (m.ffn_dim, m.dim)),
            (f"{prefix}.ffn.w3.weight", (m.ffn_dim, m.dim)),
            (f"{prefix}.ffn.w2.weight", (m.dim, m.ffn_dim)),
        ]
        return [ParamSpec(n, s, unit, False, False) for n, s in dense + ffn]
    specs = [ParamSpec(n, s, unit, False, False) for n, s in dense]
    specs.append(ParamSpec(f"{prefix}.ffn.router.weight", (m.num_experts, m.dim), unit, False, True))
    experts = f"{prefix}.ffn.experts"
    E, D, H = m.num_experts, m.dim, m.expert_dim
    for name, shape in (("w1", (E, D, H)), ("w3", (E, D, H)), ("w2", (E, H, D))):
        specs.append(ParamSpec(f"{experts}.{name}", shape, experts, True, False))
    if m.num_shared_experts:
        hidden = m.num_shared_experts * m.expert_dim
        for name, shape in (("w1", (hidden, D)), ("w3", (hidden, D)), ("w2", (D, hidden))):
            specs.append(ParamSpec(f"{prefix}.ffn.shared.{name}.weight", shape, unit, False, False))
    return specs


def model_params(m) -> list[ParamSpec]:
    """Every parameter of MoETransformer(ModelArgs.from_config(m)), in registration order."""
    root = [ParamSpec("embed.weight", (m.vocab_size, m.dim), EMBED, False, True)]
    for i in range(m.n_layers):
        root += _block_params(m, f"layers.{i}", f"layers.{i}", moe=i >= m.first_k_dense)
    root.append(ParamSpec("norm.weight", (m.dim,), ROOT, False, True))
    root.append(ParamSpec("head.weight", (m.vocab_size, m.dim), ROOT, False, True))
    mtp_moe = m.n_layers > m.first_k_dense
    for k in range(m.mtp_depth):
        p, unit = f"mtp.{k}", f"mtp.{k}"
        root.append(ParamSpec(f"{p}.hidden_norm.weight", (m.dim,), unit, False, False))
        root.append(ParamSpec(f"{p}.embed_norm.weight", (m.dim,), unit, False, False))
        root.append(ParamSpec(f"{p}.proj.weight", (m.dim, 2 * m.dim), unit, False, False))
        root += _block_params(m, f"{p}.block", unit, moe=mtp_moe)
        root.append(ParamSpec(f"{p}.norm.weight", (m.dim,), unit, False, False))
    return root


def model_buffers(m) -> dict[str, tuple[int, ...]]:
    """Every buffer (fp32, never sharded: each rank holds all of them)."""
    half_head = m.dim // m.n_heads // 2
    buffers = {"rope_cos": (m.seq_len, half_head), "rope_sin": (m.seq_len, half_head)}
    moe_prefixes = [f"layers.{i}.ffn" for i in range(m.first_k_dense, m.n_layers)]
    if m.n_layers > m.first_k_dense:
        moe_prefixes += [f"mtp.{k}.block.ffn" for k in range(m.mtp_depth)]
    for p in moe_prefixes:
        buffers[f"{p}.tokens_per_expert"] = (m.num_experts,)
        buffers[f"{p}.router.expert_bias"] = (m.num_experts,)
    return buffers


def chunk_rows(rows: int, ranks: int, rank: int) -> int:
    """Rows of dim 0 that `rank` keeps when torch.chunk splits `rows` into `ranks` parts
    (what FSDP2 does; the last ranks may get fewer rows, or none)."""
    size = -(-rows // ranks)
    return max(0, min(size, rows - rank * size))


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank needs at its peak (the start of the backward of the last micro-batch)."""

    params: int  # fp32 master shards
    grads: int  # fp32 gradient shards
    optimizer: int  # AdamW exp_avg + exp_avg_sq (fp32) and one fp32 step per tensor
    buffers: int  # rope tables, router biases, expert token counts (fp32, whole on every rank)
    fsdp_in_flight: int  # unsharded copies: the root's params and grads, two gathered units, one unit's grads
    accumulated_grads: int  # unsharded fp32 grads FSDP2 keeps between micro-batches (grad accumulation)
    activations: int  # what autograd saves for the micro-batches in flight (one without a pipeline), plus logits

    @property
    def total(self) -> int:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.buffers
            + self.fsdp_in_flight
            + self.accumulated_grads
            + self.activations
        )


@dataclass(frozen=True)
class CommVolume:
    """One kind of collective: bytes each rank sends per optimizer step (ring algorithms)."""

    what: str
    group: str  # the mesh dimension it runs over
    group_size: int
    bytes_per_step: int


@dataclass(frozen=True)
class Plan:
    layout: Layout
    precision: str
    activation_checkpointing: str
    micro_batch_size: int
    micro_batches: int  # per rank per step (gradient accumulation when > 1)
    total_params: int
    expert_params: int
    active_params: int  # per token: everything but the routed experts a token does not use
    ranks: list[RankMemory]  # index = global rank
    comm: list[CommVolume]  # with a pipeline: the busiest pipeline rank's bytes, per collective
    pipeline: tuple[PipelineRank, ...] = ()  # index = pipeline rank; empty when pp == 1
    pipeline_comm: tuple[tuple[CommVolume, ...], ...] = ()  # index = pipeline rank: its own bytes


@dataclass(frozen=True)
class PipelineRank:
    """What one pipeline rank holds: its stages' pieces and the micro-batches whose activations
    they keep at once under the schedule."""

    stages: tuple[tuple[int, tuple[str, ...]], ...]  # (stage, its piece names), as the rank holds them
    pieces: frozenset[str]  # what the pruned model keeps (the MTP modules' embedding copy included)
    in_flight: tuple[tuple[int, int], ...]  # (stage, the most micro-batches it holds activations of at once)


def _compute_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def block_activation_bytes(m, moe: bool, precision: str, ep: int) -> tuple[int, int]:
    """Per token, what autograd keeps for one block: (with no checkpointing, with selective
    checkpointing: the outputs of matmuls, attention and all-to-alls, the rest recomputed).
    Assumes balanced routing: each rank's experts get tokens x top_k rows on average."""
    p = _compute_bytes(precision)
    copy32 = FP32 if precision == "bf16" else 0  # an fp32 copy that only exists under bf16
    D, H = m.dim, m.n_heads
    kv = m.n_kv_heads * (m.dim // m.n_heads)
    norm = 2 * FP32 * D + FP32  # RMSNorm keeps its fp32 input, the normalised output and 1/rms
    # wq/wk/wv input, SDPA's q, k, v (after RoPE; k, v repeated to n_heads), output and
    # log-sum-exp, wo's input. RoPE multiplies by constant tables: it keeps nothing.
    attn_none = norm + p * D + 3 * p * D + p * D + FP32 * H + p * D
    attn_selective = p * (D + 2 * kv) + p * D + FP32 * H + p * D
    if not moe:
        # SwiGLU: its input, w1 and w3 outputs, silu output, w2's input.
        return attn_none + norm + p * D + 4 * p * m.ffn_dim, attn_selective + 2 * p * m.ffn_dim + p * D
    K, Dh, E = m.top_k, m.expert_dim, m.num_experts
    shared = m.num_shared_experts * Dh
    indices = INT64 * K * (4 + (1 if ep > 1 else 0))  # top-k ids, sort order, gate gather, index_add, regroup
    moe_none = (
        norm
        + p * D  # the normed input of router, dispatch and shared experts
        + copy32 * D  # the router's fp32 input
        + FP32 * E  # router affinities
        + FP32 * (2 * K + 1)  # gate weights, their sum, the gates per dispatched row
        + indices
        + p * K * D  # dispatched rows
        + 4 * p * K * Dh  # expert w1, w3 outputs, silu output, w2 input
        + 2 * FP32 * K * D  # combine: expert outputs in fp32, and the gated rows index_add keeps
        + 4 * p * shared  # shared experts likewise
    )
    # Selective: router logits, dispatch and combine all-to-all outputs, expert and shared matmul outputs.
    moe_selective = FP32 * E + 2 * p * K * D + p * K * (2 * Dh + D) + p * (2 * shared + D)
    return attn_none + moe_none, attn_selective + moe_selective


def block_kept_for_weight_bytes(m, moe: bool, precision: str) -> int:
    """Per token, what one block still holds between B and W of a split backward
    (parallel/pipeline/backward_split.py releases after B what only B's nodes saved): the inputs
    of the weight matmuls and grouped GEMMs, and the normalised outputs the norms' weights multiply.
    The same with any checkpointing: B's rerun saves the block's graph, B then frees the rest.
    Assumes balanced routing, as block_activation_bytes."""
    p = _compute_bytes(precision)
    copy32 = FP32 if precision == "bf16" else 0
    D = m.dim
    norms = 2 * FP32 * D  # attention's and the FFN's normalised fp32 output (times the norm weight)
    attn = p * D + p * D  # wq/wk/wv's input, wo's input
    if not moe:
        return norms + attn + p * D + p * m.ffn_dim  # w1/w3's input, w2's input
    K, Dh = m.top_k, m.expert_dim
    shared = m.num_shared_experts * Dh
    # The normed input (router, shared experts), the router's fp32 copy of it, the dispatched rows
    # (experts' w1/w3 input), the experts' and shared experts' w2 input.
    ffn = p * D + copy32 * D + p * K * D + p * K * Dh + (p * shared if shared else 0)
    return norms + attn + ffn


def logits_bytes(m, micro_batch_size: int) -> int:
    """The fp32 logits of the main head and of every MTP depth: the model returns them all,
    and they live until the loss's backward (autograd itself keeps their log-softmax)."""
    tokens = m.seq_len + sum(m.seq_len - k for k in range(1, m.mtp_depth + 1))
    return micro_batch_size * tokens * FP32 * m.vocab_size


def _check_checkpointing(checkpointing: str) -> None:
    if checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"train.activation_checkpointing={checkpointing}: allowed: {', '.join(ACTIVATION_CHECKPOINTING)}"
        )


def _block_tokens(m) -> dict[str, tuple[bool, int]]:
    """Every block, as its piece name: (is it MoE, tokens per sequence it runs)."""
    moe_layers = m.n_layers - m.first_k_dense
    blocks = {f"layers.{i}": (i >= m.first_k_dense, m.seq_len) for i in range(m.n_layers)}
    blocks.update({f"mtp.{k - 1}": (moe_layers > 0, m.seq_len - k) for k in range(1, m.mtp_depth + 1)})
    return blocks


def piece_activation_bytes(m, micro_batch_size: int, precision: str, checkpointing: str, ep: int) -> dict[str, int]:
    """Per piece of parallel/pipeline/stage_cut.py (embed, layers.i, head, mtp.k): what autograd
    saves for one micro-batch until its backward. The head holds the loss's part (token ids,
    final norm, head input, log-softmax, targets); logits and recomputation are counted apart."""
    _check_checkpointing(checkpointing)
    p = _compute_bytes(precision)
    S, D, V = m.seq_len, m.dim, m.vocab_size
    per_block = {moe: block_activation_bytes(m, moe, precision, ep) for moe in (False, True)}

    def saved(moe: bool) -> int:
        none, selective = per_block[moe]
        if checkpointing == "none":
            return none
        return p * D + (selective if checkpointing == "selective" else 0)  # the block input, kept

    # Never checkpointed: token ids, final norm, fp32 head input, log-softmax output, targets.
    loss_part = INT64 + 2 * FP32 * D + FP32 * D + FP32 * V + INT64
    mtp_part = 2 * 2 * FP32 * D + 2 * p * D  # the MTP module's two input norms and their concat
    pieces = {"embed": 0}
    for name, (moe, tokens) in _block_tokens(m).items():
        extra = mtp_part + loss_part if name.startswith("mtp.") else 0
        pieces[name] = micro_batch_size * tokens * (saved(moe) + extra)
        if name == f"layers.{m.n_layers - 1}":
            pieces["head"] = micro_batch_size * S * loss_part
    return pieces


def piece_kept_for_weight_bytes(m, micro_batch_size: int, precision: str) -> dict[str, int]:
    """Per piece, what one micro-batch still holds between its B and its W (see
    block_kept_for_weight_bytes); the head keeps the final norm's normalised output and its fp32
    input, an MTP module also its two input norms' outputs and the projection's input."""
    p = _compute_bytes(precision)
    D = m.dim
    loss_part = FP32 * D + FP32 * D
    mtp_part = 2 * FP32 * D + 2 * p * D
    pieces = {"embed": 0}
    for name, (moe, tokens) in _block_tokens(m).items():
        extra = mtp_part + loss_part if name.startswith("mtp.") else 0
        pieces[name] = micro_batch_size * tokens * (block_kept_for_weight_bytes(m, moe, precision) + extra)
        if name == f"layers.{m.n_layers - 1}":
            pieces["head"] = micro_batch_size * m.seq_len * loss_part
    return pieces


def recompute_bytes(m, pieces, micro_batch_size: int, precision: str, checkpointing: str, ep: int) -> int:
    """With checkpointing, backward recomputes one block at a time: the largest whole set of the
    blocks among `pieces` lives while it runs (0 without checkpointing or blocks)."""
    if checkpointing == "none":
        return 0
    blocks = _block_tokens(m)
    held = [blocks[name][0] for name in pieces if name in blocks]
    return (
        micro_batch_size
        * m.seq_len
        * max((block_activation_bytes(m, moe, precision, ep)[0] for moe in held), default=0)
    )


def activation_bytes(m, micro_batch_size: int, precision: str, checkpointing: str, ep: int) -> int:
    """Bytes of activations for one micro-batch on one rank at the end of its forward (the
    peak: backward frees them block by block): what autograd saves, plus the logits."""
    pieces = piece_activation_bytes(m, micro_batch_size, precision, checkpointing, ep)
    recompute = recompute_bytes(m, pieces, micro_batch_size, precision, checkpointing, ep)
    return sum(pieces.values()) + recompute + logits_bytes(m, micro_batch_size)


def _block_group(unit: str) -> str:
    """The block an FSDP unit belongs to: an experts unit runs inside its block's backward."""
    return ".".join(unit.split(".")[:2])  # layers.3.ffn.experts -> layers.3, mtp.0.block.ffn.experts -> mtp.0


def fsdp_in_flight_bytes(params: list[ParamSpec], layout: Layout, precision: str, accumulate: bool) -> int:
    """Unsharded copies next to the shards at the start of the last micro-batch's backward.
    The root (final norm, head) stays gathered in fp32 from forward to backward and its head
    gradient (fp32, unsharded) appears first; the embedding is resharded after its forward and
    never gathered again, but with MTP modules its fp32 gradient appears early in the backward
    (theirs runs first) and stays unsharded to its end. Two blocks are gathered in compute dtype
    (the one running and the one prefetched); one block's gradients exist in compute dtype and
    as the fp32 reduce-scatter input. With gradient accumulation the root's and the embedding's
    unsharded gradients are part of the accumulated ones, so they are not counted twice here."""
    p = _compute_bytes(precision)
    root = sum(s.numel for s in params if s.unit == ROOT)
    mtp = any(s.unit.startswith("mtp.") for s in params)
    embed_grads = 0 if accumulate or not mtp else FP32 * sum(s.numel for s in params if s.unit == EMBED)
    blocks: dict[str, list[int]] = {}
    for s in params:
        if s.unit not in (ROOT, EMBED):
            elems = blocks.setdefault(_block_group(s.unit), [0, 0])
            elems[1 if s.fp32_compute else 0] += s.numel // layout.ep if s.expert else s.numel
    gathered = sorted((p * lo + FP32 * hi for lo, hi in blocks.values()), reverse=True)
    grads = max(((p + FP32) * lo + 2 * FP32 * hi for lo, hi in blocks.values()), default=0)
    return FP32 * root * (1 if accumulate else 2) + embed_grads + sum(gathered[:2]) + grads


def unit_gather_bytes(params: list[ParamSpec], layout: Layout, precision: str) -> dict[str, int]:
    """FSDP unit -> the bytes one all-gather of it produces on a rank holding `params`: the whole
    unit in its compute dtype (what computes in fp32 stays fp32), routed experts the rank's 1/ep."""
    p = _compute_bytes(precision)
    out: dict[str, int] = {}
    for s in params:
        elems = s.numel // layout.ep if s.expert else s.numel
        out[s.unit] = out.get(s.unit, 0) + elems * (FP32 if s.fp32_compute else p)
    return out


def _is_expert_unit(unit: str) -> bool:
    return unit.endswith(".experts")


def pipeline_fsdp_in_flight(params: list[ParamSpec], layout: Layout, precision: str, walk: UnitWalk) -> int:
    """Unsharded copies on a pipeline rank at their most: the gathered units of the walk (the root
    for the whole step, each stage's units from a backward to the stage's next forward) and, under
    bf16, one unit's gradients in bf16 before FSDP2 folds them into their fp32 accumulators. The
    fp32 unsharded gradients themselves are the accumulated grads (every unit, all step)."""
    if precision != "bf16":
        return walk.peak_gathered
    lo: dict[str, int] = {}
    for s in params:
        if not s.fp32_compute:
            lo[s.unit] = lo.get(s.unit, 0) + (s.numel // layout.ep if s.expert else s.numel)
    return walk.peak_gathered + _compute_bytes(precision) * max(lo.values(), default=0)


def piece_of(name: str) -> str | None:
    """The stage_cut piece a parameter or buffer belongs to (the final norm goes with the head);
    None for the RoPE tables, which every stage keeps."""
    if name.startswith(("layers.", "mtp.")):
        return ".".join(name.split(".")[:2])
    if name.startswith(("norm.", "head.")):
        return "head"
    return "embed" if name.startswith("embed.") else None


def kept_pieces(stage_pieces: list[tuple[str, ...]], mtp_depth: int) -> frozenset[str]:
    """What parallel/pipeline/stage.py keep_pieces leaves of the model for a rank with these
    stages: their pieces, and the embedding where the MTP modules are (they embed the next tokens)."""
    pieces = frozenset(name for stage in stage_pieces for name in stage)
    return pieces | {"embed"} if "head" in pieces and mtp_depth > 0 else pieces


def unit_stages(params: list[ParamSpec], held: PipelineRank, mtp_depth: int) -> dict[str, frozenset[int]]:
    """FSDP unit -> the stages of a pipeline rank that run it: the stages of its parameters' pieces;
    the embedding also serves the head's stage, where the MTP modules embed the next tokens."""
    stages_of: dict[str, set[int]] = {}
    for stage, names in held.stages:
        for name in names:
            stages_of.setdefault(name, set()).add(stage)
    uses = {piece: set(stages) for piece, stages in stages_of.items()}
    if mtp_depth:
        uses["embed"] = stages_of.get("embed", set()) | stages_of.get("head", set())
    out: dict[str, set[int]] = {}
    for s in params:
        out.setdefault(s.unit, set()).update(uses.get(piece_of(s.name), set()))
    return {unit: frozenset(stages) for unit, stages in out.items()}


def _releases(part) -> bool:
    """Does this part of an action free its micro-batch's saved activations? BW does, and W: B
    (parallel/pipeline/backward_split.py) runs with the graph retained, which its W then frees."""
    return part.kind in (Kind.BW, Kind.W)


def in_flight_microbatches(schedule: PipelineSchedule) -> dict[int, dict[int, int]]:
    """rank -> stage -> the most micro-batches whose activations the stage holds at once: the
    maximum over the rank's action list of forwards done minus BW or W done (a B keeps its
    micro-batch's whole graph until the W). F&B counts its forward first."""
    counts: dict[int, dict[int, int]] = {}
    for rank in range(schedule.pp):
        live: dict[int, int] = {}
        most: dict[int, int] = {}
        for action in schedule.compute_actions(rank):
            for part in action.parts():
                if part.kind is Kind.F:
                    live[part.stage] = live.get(part.stage, 0) + 1
                    most[part.stage] = max(most.get(part.stage, 0), live[part.stage])
                elif _releases(part):
                    live[part.stage] -= 1
        counts[rank] = most
    return counts


def peak_in_flight_bytes(
    schedule: PipelineSchedule, rank: int, stage_bytes: dict[int, int], kept_after_b: dict[int, int] | None = None
) -> int:
    """The most bytes of saved activations `rank` holds at once, its stages weighted by
    `stage_bytes` (one micro-batch each): the walk of in_flight_microbatches, in bytes. With
    `kept_after_b` (stage -> what a micro-batch holds between its B and W), a B frees the rest
    (parallel/pipeline/backward_split.py) but on stage 0, whose B computes nothing; else, as
    under saved-tensor hooks that keep every tensor until W, B frees nothing."""
    live = peak = 0
    split: set[tuple[int, int, int]] = set()  # (direction, stage, micro-batch) between a releasing B and its W
    for action in schedule.compute_actions(rank):
        for part in action.parts():
            if part.kind is Kind.F:
                live += stage_bytes[part.stage]
            elif part.kind is Kind.B and kept_after_b is not None and part.stage != 0:
                live += kept_after_b[part.stage] - stage_bytes[part.stage]
                split.add((part.direction, part.stage, part.microbatch))
            elif part.kind is Kind.W and (part.direction, part.stage, part.microbatch) in split:
                live -= kept_after_b[part.stage]
                split.discard((part.direction, part.stage, part.microbatch))
            elif _releases(part):
                live -= stage_bytes[part.stage]
            peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class UnitWalk:
    """What FSDP2 does with a pipeline rank's units over one step (pipeline_unit_walk)."""

    gathers: dict[str, int]  # unit -> all-gathers per step
    peak_gathered: int  # the most bytes of gathered (unsharded) parameters at once


def pipeline_unit_walk(
    schedule: PipelineSchedule,
    rank: int,
    unit_stages: dict[str, frozenset[int]],
    unit_bytes: dict[str, int],
    kept: frozenset[str] = frozenset(),
    forward_only: frozenset[str] = frozenset(),
) -> UnitWalk:
    """FSDP2 under parallel/pipeline/runtime.py, walked over `rank`'s action list. A unit (used by
    the stages `unit_stages[u]`, `unit_bytes[u]` gathered) is all-gathered by a forward or a
    backward that finds it sharded; FSDP2 reshards it after each forward (`reshard_after_forward`,
    its default for every unit but the root), while the runtime keeps it unsharded after a
    backward until the step ends (parallel/compat.py defer_fsdp_gradient_reduction), so a
    forward right after a backward of its stage gathers nothing. Units in `kept` (the root)
    are never resharded within the step: gathered once; units in `forward_only` (the
    embedding) are never gathered by a backward, which reads none of their weights. A backward
    is BW, B, or on the first stage W (stage 0 has no input gradient: its B computes nothing
    and its W the whole backward); W elsewhere reads no weight. FSDP2's backward prefetch moves gathers earlier and
    now and then adds one (a prefetched unit that a forward reshards unused): measured on CPU
    layouts, the gathered bytes come out within 3% (tests/parallel/test_plan.py)."""
    gathered = dict.fromkeys(unit_stages, False)
    gathers = dict.fromkeys(unit_stages, 0)
    peak = 0
    for action in schedule.compute_actions(rank):
        for part in action.parts():
            backward = part.kind is Kind.BW or part.kind is (Kind.W if part.stage == 0 else Kind.B)
            if part.kind is not Kind.F and not backward:
                continue
            users = [u for u, stages in unit_stages.items() if part.stage in stages]
            if backward:
                users = [u for u in users if u not in forward_only]
            fresh = [u for u in users if not gathered[u]]
            before = sum(unit_bytes[u] for u, on in gathered.items() if on)
            for u in users:
                gathers[u] += u in fresh
                gathered[u] = backward or u in kept
            after = sum(unit_bytes[u] for u, on in gathered.items() if on)
            # A forward gathers its sharded units one at a time (each resharded after its own forward).
            running = 0 if backward else max((unit_bytes[u] for u in fresh), default=0)
            peak = max(peak, after, before + running)
    return UnitWalk(gathers, peak)


def pipeline_ranks(
    m, layout: Layout, schedule_name: str, micro_batches: int, virtual_stages: int = 2
) -> tuple[PipelineSchedule, list[PipelineRank], tuple[int, ...]]:
    """The schedule, per pipeline rank its stages cut as framework/train.py cuts them, and the
    two ranks that sum the embedding's gradient where the MTP modules hold a copy (else ()).
    `virtual_stages`: stages per rank for interleaved_1f1b."""
    cut: StagePlan = plan_stages(model_pieces(m), schedule_name, layout.pp, virtual_stages)
    embed_pair = (cut.rank_of_piece("embed"), cut.rank_of_piece("head")) if mtp_needs_embedding(cut) else ()
    schedule = build_schedule(schedule_name, layout.pp, micro_batches, virtual_stages)
    in_flight = in_flight_microbatches(schedule)
    ranks = []
    for rank in range(layout.pp):
        held = sorted({s for _, s in schedule.stages_of(rank)})
        stages = tuple((s, cut.stages[s]) for s in held)
        pieces = kept_pieces([names for _, names in stages], m.mtp_depth)
        ranks.append(PipelineRank(stages, pieces, tuple(sorted(in_flight[rank].items()))))
    return schedule, ranks, embed_pair


def plan(
    m,
    layout: Layout,
    precision: str,
    micro_batch_size: int,
    global_batch_size: int,
    activation_checkpointing: str = "none",
    pp_schedule: str = "1f1b",
    pp_virtual_stages: int = 2,
    release_after_b: bool = True,
) -> Plan:
    """The per-rank memory and per-step communication of training `m` on `layout`; with a
    pipeline each pipeline rank counts the pieces its stages hold under `pp_schedule`
    (`pp_virtual_stages` of them per rank for interleaved_1f1b). `release_after_b`: a split
    backward's B frees what W does not need (False: as under saved-tensor hooks, which keep it)."""
    all_params = model_params(m)
    all_buffers = model_buffers(m)
    micro_batches = global_batch_size // layout.dp // micro_batch_size
    accumulate = micro_batches > 1
    schedule, stages, embed_pair = None, [], ()
    if layout.pp > 1:
        schedule, stages, embed_pair = pipeline_ranks(m, layout, pp_schedule, micro_batches, pp_virtual_stages)
        piece_bytes = piece_activation_bytes(m, micro_batch_size, precision, activation_checkpointing, layout.ep)
        piece_kept = piece_kept_for_weight_bytes(m, micro_batch_size, precision) if release_after_b else None

    memory_of: list[Callable[[int], RankMemory]] = []  # pipeline rank -> data-parallel rank -> memory
    comms: list[list[CommVolume]] = []
    for pp_rank in range(layout.pp):
        if schedule is None:
            params, buffers = all_params, all_buffers
            activations = activation_bytes(m, micro_batch_size, precision, activation_checkpointing, layout.ep)
            passes = micro_batches
            # Forward gathers every unit, backward every unit but the root again (FSDP2 keeps the
            # root gathered from forward to backward and reshards the others after forward); the
            # embedding is gathered by each of its forward calls (the MTP modules' too) only.
            calls = {ROOT: 1, EMBED: 1 + (m.mtp_depth > 0)}
            gathers = {s.unit: micro_batches * calls.get(s.unit, 2) for s in params}
            in_flight = fsdp_in_flight_bytes(params, layout, precision, accumulate)
        else:
            held = stages[pp_rank]
            params = [s for s in all_params if piece_of(s.name) in held.pieces]
            buffers = {n: s for n, s in all_buffers.items() if piece_of(n) in held.pieces | {None}}
            stage_bytes = {s: sum(piece_bytes[n] for n in names) for s, names in held.stages}
            kept = None if piece_kept is None else {s: sum(piece_kept[n] for n in names) for s, names in held.stages}
            activations = peak_in_flight_bytes(schedule, pp_rank, stage_bytes, kept)
            ran = [n for _, names in held.stages for n in names]
            activations += recompute_bytes(m, ran, micro_batch_size, precision, activation_checkpointing, layout.ep)
            if "head" in ran:  # the loss takes one micro-batch's logits at a time
                activations += logits_bytes(m, micro_batch_size)
            passes = micro_batches // schedule.directions  # DualPipe: each stage runs half the micro-batches
            walk = pipeline_unit_walk(
                schedule,
                pp_rank,
                unit_stages(params, held, m.mtp_depth),
                unit_gather_bytes(params, layout, precision),
                kept=frozenset({ROOT}),
                forward_only=frozenset({EMBED}),
            )
            gathers, in_flight = walk.gathers, pipeline_fsdp_in_flight(params, layout, precision, walk)
        # A pipeline keeps every unit's fp32 gradient unsharded until the step ends (runtime.py).
        memory_of.append(
            _rank_memory(params, buffers, layout, accumulate or schedule is not None, activations, in_flight)
        )
        comm = communication(m, layout, params, precision, micro_batch_size, passes, activation_checkpointing, gathers)
        if schedule is not None:
            comm += pipeline_communication(m, layout, schedule, pp_rank, params, micro_batch_size, embed_pair)
        comms.append(comm)

    expert_total = sum(s.numel for s in all_params if s.expert)
    total = sum(s.numel for s in all_params)
    return Plan(
        layout=layout,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        micro_batch_size=micro_batch_size,
        micro_batches=micro_batches,
        total_params=total,
        expert_params=expert_total,
        active_params=total - expert_total + expert_total * m.top_k // m.num_experts,
        ranks=[memory_of[rank // layout.dp](rank % layout.dp) for rank in range(layout.world_size)],
        comm=[max(kind, key=lambda c: c.bytes_per_step) for kind in zip(*comms, strict=True)],
        pipeline=tuple(stages),
        pipeline_comm=tuple(map(tuple, comms)) if schedule is not None else (),
    )


def _rank_memory(
    params: list[ParamSpec],
    buffers: dict[str, tuple[int, ...]],
    layout: Layout,
    accumulate: bool,
    activations: int,
    in_flight: int,
) -> Callable[[int], RankMemory]:
    """-> data-parallel rank -> the RankMemory of a rank that holds `params` (the whole model, or
    one pipeline rank's pieces), sharded over dp and ep as framework/build.py shards them;
    `in_flight`: its FSDP unsharded copies."""
    # With gradient accumulation FSDP2 skips the reduce-scatter on all but the last
    # micro-batch and keeps every unit's unsharded gradient in fp32 in between.
    rank_elems = sum(s.numel // layout.ep if s.expert else s.numel for s in params)
    accumulated = FP32 * rank_elems if accumulate else 0
    steps = FP32 * len(params)  # AdamW's step counter: one fp32 scalar per parameter tensor
    buffer_bytes = FP32 * sum(math.prod(s) for s in buffers.values())

    @cache
    def shard_bytes(shard_rank: int, edp_rank: int) -> int:
        elems = 0
        for spec in params:
            inner = spec.numel // spec.shape[0]
            if spec.expert:
                rows = chunk_rows(spec.shape[0] // layout.ep, layout.edp_shard, edp_rank)
            else:
                rows = chunk_rows(spec.shape[0], layout.dp_shard, shard_rank)
            elems += rows * inner
        return FP32 * elems

    def memory(d: int) -> RankMemory:  # d: the data-parallel rank
        held = shard_bytes(d % layout.dp_shard, (d // layout.ep) % layout.edp_shard)
        return RankMemory(held, held, 2 * held + steps, buffer_bytes, in_flight, accumulated, activations)

    return memory


def _ring(n: int) -> float:
    """Fraction of the payload each rank sends in a ring all-gather or reduce-scatter."""
    return (n - 1) / n


def communication(
    m,
    layout: Layout,
    params: list[ParamSpec],
    precision: str,
    micro_batch_size: int,
    micro_batches: int,
    checkpointing: str,
    gathers: dict[str, int],
) -> list[CommVolume]:
    """Bytes each rank sends per optimizer step, per kind of collective, for a rank holding
    `params` that runs each of its blocks on `micro_batches` micro-batches per step and
    all-gathers each FSDP unit `gathers[unit]` times per step. Gradients are reduced once per step."""
    p = _compute_bytes(precision)
    dense = [s for s in params if not s.expert]
    local_experts = sum(s.numel for s in params if s.expert) // layout.ep
    gathered = unit_gather_bytes(params, layout, precision)
    dense_gather = sum(n * gathered[u] for u, n in gathers.items() if not _is_expert_unit(u))
    expert_gather = sum(n * gathered[u] for u, n in gathers.items() if _is_expert_unit(u))
    dense_grads, expert_grads = FP32 * sum(s.numel for s in dense), FP32 * local_experts
    # EP: every MoE block sends each routed (token, slot) row out (dispatch) and back
    # (combine), and their gradients the other way; with balanced routing (ep-1)/ep of the
    # rows leave the rank. Full checkpointing runs the forward pair again in backward.
    blocks = _block_tokens(m)
    tokens = sum(blocks[piece_of(s.name)][1] for s in params if s.expert and s.name.endswith(".w1"))
    passes = 6 if checkpointing == "full" else 4
    a2a = micro_batch_size * tokens * m.top_k * m.dim * p * passes * _ring(layout.ep)
    sizes = {"ep": layout.ep, "dp_shard": layout.dp_shard, "edp_shard": layout.edp_shard}
    sizes.update(dp_replicate=layout.dp_replicate, edp_replicate=layout.edp_replicate)
    volumes = [
        ("EP all-to-all: dispatch + combine, fwd + bwd", "ep", a2a * micro_batches),
        ("FSDP all-gather: dense params", "dp_shard", dense_gather * _ring(layout.dp_shard)),
        ("FSDP reduce-scatter: dense grads", "dp_shard", dense_grads * _ring(layout.dp_shard)),
        ("FSDP all-gather: expert params", "edp_shard", expert_gather * _ring(layout.edp_shard)),
        ("FSDP reduce-scatter: expert grads", "edp_shard", expert_grads * _ring(layout.edp_shard)),
        # Ring all-reduce of each rank's gradient shard across the replicas: 2(n-1)/n.
        (
            "HSDP all-reduce: dense grads",
            "dp_replicate",
            2 * dense_grads / layout.dp_shard * _ring(layout.dp_replicate),
        ),
        (
            "HSDP all-reduce: expert grads",
            "edp_replicate",
            2 * expert_grads / layout.edp_shard * _ring(layout.edp_replicate),
        ),
    ]
    return [CommVolume(what, group, sizes[group], round(volume)) for what, group, volume in volumes]


def pipeline_communication(
    m,
    layout: Layout,
    schedule: PipelineSchedule,
    pp_rank: int,
    params: list[ParamSpec],
    micro_batch_size: int,
    embed_pair: tuple[int, ...],
) -> list[CommVolume]:
    """Bytes pipeline rank `pp_rank` sends per step: each SEND_F (a stage's output) and SEND_B
    (its input's gradient) of its action list is one [micro-batch, seq_len, dim] fp32 tensor
    (runtime.py WIRE_DTYPE); then the gradient all-reduces over two pipeline ranks that hold the
    same weights: the MTP modules' embedding copy (`embed_pair`: the embedding's rank and the
    head's, where they differ), and DualPipe's mirror pair (all its weights)."""
    sends = sum(1 for a in schedule.actions[pp_rank] if a.kind in (Kind.SEND_F, Kind.SEND_B))
    p2p = sends * micro_batch_size * m.seq_len * m.dim * FP32
    copy = FP32 * m.vocab_size * m.dim / layout.dp_shard if pp_rank in embed_pair else 0
    mirrored = 0
    if schedule.directions == 2:
        dense = sum(s.numel for s in params if not s.expert) / layout.dp_shard
        experts = sum(s.numel for s in params if s.expert) / layout.ep / layout.edp_shard
        mirrored = FP32 * (dense + experts)
    # A ring all-reduce over 2 ranks sends the payload once: 2(n-1)/n = 1.
    volumes = [CommVolume("pipeline send: activations + grads, fwd + bwd", "pp", layout.pp, p2p)]
    if embed_pair:
        volumes.append(CommVolume("pipeline all-reduce: MTP embedding copy grads", "pp", 2, round(copy)))
    if schedule.directions == 2:
        volumes.append(CommVolume("DualPipe all-reduce: mirror copy grads", "pp", 2, round(mirrored)))
    return volumes
