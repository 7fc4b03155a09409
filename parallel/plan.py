"""The memory and communication plan of a layout: bytes each rank holds and sends per step,
in pure Python from the model config, counting and sharding tensors as framework/ and parallel/ do."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from parallel.layout import Layout

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
FP32 = 4  # master weights, gradients, AdamW state, reductions, and what stays fp32 in compute
INT64 = 8  # token ids and routing indices that autograd keeps


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as MoETransformer.named_parameters() names it."""

    name: str
    shape: tuple[int, ...]
    unit: str  # the FSDP unit that shards it: "root", "layers.3", "layers.3.ffn.experts", "mtp.0", ...
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
    root = [ParamSpec("embed.weight", (m.vocab_size, m.dim), "root", False, True)]
    for i in range(m.n_layers):
        root += _block_params(m, f"layers.{i}", f"layers.{i}", moe=i >= m.first_k_dense)
    root.append(ParamSpec("norm.weight", (m.dim,), "root", False, True))
    root.append(ParamSpec("head.weight", (m.vocab_size, m.dim), "root", False, True))
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
    activations: int  # what autograd saves for one micro-batch, plus the loss's logits

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
    comm: list[CommVolume]


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


def logits_bytes(m, micro_batch_size: int) -> int:
    """The fp32 logits of the main head and of every MTP depth: the model returns them all,
    and they live until the loss's backward (autograd itself keeps their log-softmax)."""
    tokens = m.seq_len + sum(m.seq_len - k for k in range(1, m.mtp_depth + 1))
    return micro_batch_size * tokens * FP32 * m.vocab_size


def activation_bytes(m, micro_batch_size: int, precision: str, checkpointing: str, ep: int) -> int:
    """Bytes of activations for one micro-batch on one rank at the end of its forward (the
    peak: backward frees them block by block): what autograd saves, plus the logits."""
    if checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"train.activation_checkpointing={checkpointing}: allowed: {', '.join(ACTIVATION_CHECKPOINTING)}"
        )
    p = _compute_bytes(precision)
    S, D, V = m.seq_len, m.dim, m.vocab_size
    moe_layers = m.n_layers - m.first_k_dense
    blocks = [(False, S)] * m.first_k_dense + [(True, S)] * moe_layers
    mtp_blocks = [(moe_layers > 0, S - k) for k in range(1, m.mtp_depth + 1)]
    per_block = {moe: block_activation_bytes(m, moe, precision, ep) for moe in (False, True)}

    def saved(moe: bool) -> int:
        none, selective = per_block[moe]
        if checkpointing == "none":
            return none
        return p * D + (selective if checkpointing == "selective" else 0)  # the block input, kept

    # Never checkpointed: token ids, final norm, fp32 head input, log-softmax output, targets.
    loss_part = INT64 + 2 * FP32 * D + FP32 * D + FP32 * V + INT64
    mtp_part = 2 * 2 * FP32 * D + 2 * p * D  # the MTP module's two input norms and their concat
    total = sum(tokens * saved(moe) for moe, tokens in blocks) + S * loss_part
    total += sum(tokens * (saved(moe) + mtp_part + loss_part) for moe, tokens in mtp_blocks)
    if checkpointing != "none":
        # Backward recomputes one block at a time: its whole set lives while it runs.
        total += S * max(per_block[moe][0] for moe, _ in blocks + mtp_blocks)
    return micro_batch_size * total + logits_bytes(m, micro_batch_size)


def _block_group(unit: str) -> str:
    """The block an FSDP unit belongs to: an experts unit runs inside its block's backward."""
    return ".".join(unit.split(".")[:2])  # layers.3.ffn.experts -> layers.3, mtp.0.block.ffn.experts -> mtp.0


def fsdp_in_flight_bytes(params: list[ParamSpec], layout: Layout, precision: str, accumulate: bool) -> int:
    """Unsharded copies next to the shards at the start of the last micro-batch's backward.
    The root (embedding, final norm, head) stays gathered in fp32 from forward to backward and
    its head gradient (fp32, unsharded) appears first. Two blocks are gathered in compute dtype
    (the one running and the one prefetched); one block's gradients exist in compute dtype
    and as the fp32 reduce-scatter input. With gradient accumulation the root's unsharded
    gradients are part of the accumulated ones, so they are not counted twice here."""
    p = _compute_bytes(precision)
    root = sum(s.numel for s in params if s.unit == "root")
    blocks: dict[str, list[int]] = {}
    for s in params:
        if s.unit != "root":
            elems = blocks.setdefault(_block_group(s.unit), [0, 0])
            elems[1 if s.fp32_compute else 0] += s.numel // layout.ep if s.expert else s.numel
    gathered = sorted((p * lo + FP32 * hi for lo, hi in blocks.values()), reverse=True)
    grads = max(((p + FP32) * lo + 2 * FP32 * hi for lo, hi in blocks.values()), default=0)
    return FP32 * root * (1 if accumulate else 2) + sum(gathered[:2]) + grads


def plan(
    m,
    layout: Layout,
    precision: str,
    micro_batch_size: int,
    global_batch_size: int,
    activation_checkpointing: str = "none",
) -> Plan:
    """The per-rank memory and per-step communication of training `m` on `layout`."""
    if layout.pp != 1:
        raise ValueError(f"parallel.pp={layout.pp}: the plan covers pp=1 layouts only")
    params = model_params(m)
    micro_batches = global_batch_size // layout.dp // micro_batch_size
    accumulate = micro_batches > 1
    buffers = FP32 * sum(math.prod(s) for s in model_buffers(m).values())
    activations = activation_bytes(m, micro_batch_size, precision, activation_checkpointing, layout.ep)
    in_flight = fsdp_in_flight_bytes(params, layout, precision, accumulate)
    # With gradient accumulation FSDP2 skips the reduce-scatter on all but the last
    # micro-batch and keeps every unit's unsharded gradient in fp32 in between.
    rank_elems = sum(s.numel // layout.ep if s.expert else s.numel for s in params)
    accumulated = FP32 * rank_elems if accumulate else 0
    steps = FP32 * len(params)  # AdamW's step counter: one fp32 scalar per parameter tensor

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

    ranks = []
    for rank in range(layout.world_size):
        d = rank % layout.dp  # pp == 1: the data-parallel rank is the rank
        held = shard_bytes(d % layout.dp_shard, (d // layout.ep) % layout.edp_shard)
        ranks.append(RankMemory(held, held, 2 * held + steps, buffers, in_flight, accumulated, activations))

    expert_total = sum(s.numel for s in params if s.expert)
    total = sum(s.numel for s in params)
    return Plan(
        layout=layout,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        micro_batch_size=micro_batch_size,
        micro_batches=micro_batches,
        total_params=total,
        expert_params=expert_total,
        active_params=total - expert_total + expert_total * m.top_k // m.num_experts,
        ranks=ranks,
        comm=communication(m, layout, params, precision, micro_batch_size, micro_batches, activation_checkpointing),
    )


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
) -> list[CommVolume]:
    """Bytes each rank sends per optimizer step, per kind of collective."""
    p = _compute_bytes(precision)
    dense = [s for s in params if not s.expert]
    root = sum(s.numel for s in dense if s.unit == "root")
    blocks_lo = sum(s.numel for s in dense if s.unit != "root" and not s.fp32_compute)
    blocks_hi = sum(s.numel for s in dense if s.unit != "root" and s.fp32_compute)
    local_experts = sum(s.numel for s in params if s.expert) // layout.ep
    # Per micro-batch, forward gathers every unit and backward every unit but the root again
    # (FSDP2 reshards non-root units after forward). Gradients are reduced once per step.
    dense_gather = FP32 * root + 2 * (p * blocks_lo + FP32 * blocks_hi)
    expert_gather = 2 * p * local_experts
    dense_grads, expert_grads = FP32 * sum(s.numel for s in dense), FP32 * local_experts
    # EP: every MoE block sends each routed (token, slot) row out (dispatch) and back
    # (combine), and their gradients the other way; with balanced routing (ep-1)/ep of the
    # rows leave the rank. Full checkpointing runs the forward pair again in backward.
    moe_layers = m.n_layers - m.first_k_dense
    tokens = moe_layers * m.seq_len + (sum(m.seq_len - k for k in range(1, m.mtp_depth + 1)) if moe_layers else 0)
    passes = 6 if checkpointing == "full" else 4
    a2a = micro_batch_size * tokens * m.top_k * m.dim * p * passes * _ring(layout.ep)
    sizes = {"ep": layout.ep, "dp_shard": layout.dp_shard, "edp_shard": layout.edp_shard}
    sizes.update(dp_replicate=layout.dp_replicate, edp_replicate=layout.edp_replicate)
    volumes = [
        ("EP all-to-all: dispatch + combine, fwd + bwd", "ep", a2a * micro_batches),
        ("FSDP all-gather: dense params", "dp_shard", dense_gather * micro_batches * _ring(layout.dp_shard)),
        ("FSDP reduce-scatter: dense grads", "dp_shard", dense_grads * _ring(layout.dp_shard)),
        ("FSDP all-gather: expert params", "edp_shard", expert_gather * micro_batches * _ring(layout.edp_shard)),
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
