"""The plan's numbers against the real thing: the built model's parameters and buffers, the
activations autograd saves, and the per-rank bytes the trainer measures on gloo layouts."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from framework.config import Config
from framework.model.args import ModelArgs
from framework.model.transformer import MoETransformer
from parallel.layout import resolve_layout
from parallel.pipeline import build_schedule
from parallel.plan import (
    FP32,
    activation_bytes,
    block_kept_for_weight_bytes,
    chunk_rows,
    in_flight_microbatches,
    logits_bytes,
    model_buffers,
    model_params,
    peak_in_flight_bytes,
    piece_activation_bytes,
    pipeline_unit_walk,
    plan,
)
from scripts.benchlib import run_ranks
from tests.parallel.harness import graph_nodes, make_config, saved_storages

MODEL_VARIANTS = {
    "tiny": ("tiny", {}),
    "small": ("small", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    "all dense, mtp 2": ("tiny", {"first_k_dense": 4, "mtp_depth": 2}),
    "no shared, MHA, no mtp": ("tiny", {"num_shared_experts": 0, "n_kv_heads": 4, "mtp_depth": 0}),
    "odd sizes": ("tiny", {"dim": 96, "n_heads": 6, "n_kv_heads": 3, "vocab_size": 77, "expert_dim": 40}),
}


def model_config(preset: str, overrides: dict):
    schema = OmegaConf.structured(ModelArgs)
    return OmegaConf.merge(schema, OmegaConf.load(f"configs/model/{preset}.yaml"), overrides)


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_params_and_buffers_are_exactly_what_the_model_builds(variant):
    m = model_config(*MODEL_VARIANTS[variant])
    with torch.device("meta"):  # deepseek_v3 has 684B parameters: shapes only
        model = MoETransformer(ModelArgs.from_config(m))
    built = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert [(s.name, s.shape) for s in model_params(m)] == built
    assert model_buffers(m) == {name: tuple(b.shape) for name, b in model.named_buffers()}
    expert_names = {f"{n}.{w}" for n, mod in model.named_modules() if n.endswith("experts") for w in ("w1", "w2", "w3")}
    assert {s.name for s in model_params(m) if s.expert} == expert_names


def test_chunk_rows_is_torch_chunk():
    for rows in (0, 1, 7, 8, 32, 33):
        for ranks in (1, 2, 3, 4, 5, 8):
            chunks = torch.arange(rows).chunk(ranks) if rows else ()
            expected = [len(c) for c in chunks] + [0] * (ranks - len(chunks))
            assert [chunk_rows(rows, ranks, r) for r in range(ranks)] == expected


def train_step_saved_bytes(trainer) -> int:
    """Train one step of one micro-batch; -> bytes of the distinct storages autograd saved,
    weights excluded. Under FSDP the gathered weights appear in each unit's pre-forward hook,
    which runs before the one registered here."""
    model = trainer.model
    weights: set[int] = set()

    def refresh(*_) -> None:
        # Replaced, not grown: a resharded unit's freed memory may hold activations later.
        storages = [(t.to_local() if hasattr(t, "to_local") else t).untyped_storage() for t in model.parameters()]
        storages += [b.untyped_storage() for b in model.buffers()]
        weights.clear()
        weights.update(s.data_ptr() for s in storages if s.nbytes())

    hooks = [mod.register_forward_pre_hook(refresh) for mod in model.modules()]
    saved: dict[int, int] = {}
    # Every packed tensor stays referenced until the step ends: a storage freed early (a graph
    # branch dropped in the forward) would otherwise hand its address to a later one, which the
    # dict would then count once (an undercount that made this measurement flaky).
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        refresh()  # the weights as they are now (a resharded unit's gathered copy is gone)
        data = getattr(t, "elem", t)  # an all-to-all's result wraps the tensor it will hold
        storage = data.untyped_storage()
        if not isinstance(t, nn.Parameter) and storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
            kept.append(data)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step()
    for hook in hooks:
        hook.remove()
    kept.clear()
    return sum(saved.values())


class _Held:
    """A saved tensor as autograd holds it (the pack hook's return value): it lives exactly as
    long as autograd keeps the tensor, and tells `LiveSavedBytes` when it goes."""

    def __init__(self, tracker: LiveSavedBytes, key: int, tensor: torch.Tensor):
        self.tracker, self.key, self.tensor = tracker, key, tensor

    def __del__(self):
        self.tracker.release(self.key)


class LiveSavedBytes:
    """Bytes of the distinct storages autograd holds for backward, weights excluded, as they come
    and go; `peak` is their most at once (across the micro-batches a pipeline holds in flight).
    A storage is counted while any saved tensor on it lives (each held here, so its address
    cannot be reused meanwhile)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, saved tensors on it]
        self.now = self.peak = 0

    def _weights(self) -> set[int]:  # the weights as they are now (FSDP2 gathers and frees them)
        tensors = [(t.to_local() if hasattr(t, "to_local") else t) for t in self.model.parameters()]
        return {t.untyped_storage().data_ptr() for t in [*tensors, *self.model.buffers()]}

    def pack(self, t: torch.Tensor):
        data = getattr(t, "elem", t)  # an all-to-all's result wraps the tensor it will hold
        key = data.untyped_storage().data_ptr()
        if isinstance(t, nn.Parameter) or key in self._weights():
            return t
        entry = self.live.setdefault(key, [data.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        # Detached: holding the tensor itself (an op's output carries its grad_fn) would close a
        # cycle through the node that saves it, which then outlives the graph.
        return _Held(self, key, t.detach())

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


FSDP_COLLECTIVES = {  # torch.distributed functions FSDP2 calls (names differ between torch versions)
    "all_gather_single": "all-gather",
    "all_gather_into_tensor": "all-gather",
    "reduce_scatter_single": "reduce-scatter",
    "reduce_scatter_tensor": "reduce-scatter",
}


class CollectiveBytes:
    """Counts, while active, the bytes this rank sends in all-gathers and reduce-scatters as a
    ring does: (n-1)/n of the gathered output, of the reduce-scattered input."""

    def __init__(self):
        self.sent = {"all-gather": 0.0, "reduce-scatter": 0.0}
        self.saved: dict[str, object] = {}
        self.depth = 0

    def _wrap(self, name: str, kind: str):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            if self.depth == 0:  # one of these may call another
                big, small = (args + (kwargs.get("output"), kwargs.get("input")))[:2]
                big = big if big is not None else kwargs.get("output")
                small = small if small is not None else kwargs.get("input")
                payload = max(big.numel() * big.element_size(), small.numel() * small.element_size())
                n = dist.get_world_size(kwargs.get("group"))
                self.sent[kind] += payload * (n - 1) / n
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        return counted

    def __enter__(self):
        for name, kind in FSDP_COLLECTIVES.items():
            if hasattr(dist, name):
                self.saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, kind))
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def fsdp_bytes(comm) -> dict[str, int]:
    """The plan's FSDP all-gather and reduce-scatter bytes, dense and expert units together."""
    sent = {"all-gather": 0, "reduce-scatter": 0}
    for c in comm:
        if c.what.startswith("FSDP "):
            sent[c.what.removeprefix("FSDP ").split(":")[0]] += c.bytes_per_step
    return sent


def one_step_config(tmp_path, world: int, overrides: list[str]):
    """The harness's small model, one micro-batch per rank (so one step saves one micro-batch)."""
    return make_config(tmp_path / "run", world, [f"train.global_batch_size={world}", *overrides])


def estimate_for(cfg, world: int):
    p, t = cfg.parallel, cfg.train
    layout = resolve_layout(world, p.pp, p.dp_replicate, p.dp_shard, p.ep)
    return plan(cfg.model, layout, t.precision, t.micro_batch_size, t.global_batch_size)


def saved_estimate(cfg, estimate) -> int:
    """The activation estimate without the logits, which the model returns and autograd does not save."""
    return estimate.ranks[0].activations - logits_bytes(cfg.model, cfg.train.micro_batch_size)


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.num_shared_experts=0", "model.n_kv_heads=4", "model.mtp_depth=0"], ["model.first_k_dense=3"]],
    ids=["moe+mtp+gqa", "mha, no shared, no mtp", "all dense"],
)
def test_fp32_activation_estimate_within_10_percent_of_what_autograd_saves(tmp_path, overrides):
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = one_step_config(tmp_path, 1, ["model.seq_len=64", *overrides])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        measured = train_step_saved_bytes(Trainer(cfg, DistContext(0, 1, 0, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()
    assert saved_estimate(cfg, estimate_for(cfg, 1)) == pytest.approx(measured, rel=0.10)


def test_checkpointing_keeps_less_and_bf16_less_than_fp32():
    m = model_config("small", {})
    none, selective, full = (activation_bytes(m, 1, "bf16", c, ep=8) for c in ("none", "selective", "full"))
    assert full < selective < none
    assert activation_bytes(m, 2, "bf16", "none", ep=8) == 2 * none
    assert none < activation_bytes(m, 1, "fp32", "none", ep=8)
    with pytest.raises(ValueError, match="train.activation_checkpointing=some: allowed: none, full, selective"):
        activation_bytes(m, 1, "bf16", "some", ep=1)


def test_communication_by_hand_for_a_small_layout():
    m = model_config("tiny", {})  # dim 128, 3 MoE blocks + 1 MoE MTP block, top-2, seq 128
    layout = resolve_layout(8, 1, 2, 4, 2)  # dp_replicate 2 x dp_shard 4, ep 2 -> edp_shard 2, edp_replicate 2
    p = plan(m, layout, "bf16", micro_batch_size=2, global_batch_size=32, activation_checkpointing="none")
    comm = {c.what.split(":")[0] + ":" + c.what.split(":")[1].split(",")[0]: c for c in p.comm}
    assert p.micro_batches == 2
    # rows per micro-batch: 2 sequences x (3 x 128 + 127 MTP tokens) x top-2, 4 passes of 128 bf16 values,
    # half of them leave the rank.
    rows = 2 * (3 * 128 + 127) * 2
    assert comm["EP all-to-all: dispatch + combine"].bytes_per_step == round(2 * rows * 4 * 128 * 2 * 0.5)
    local_experts = 4 * 3 * 4 * 128 * 96  # 4 MoE blocks x w1, w2, w3 of E/ep = 4 experts
    assert comm["FSDP reduce-scatter: expert grads"].bytes_per_step == round(4 * local_experts * 0.5)
    assert comm["HSDP all-reduce: expert grads"].bytes_per_step == round(2 * 4 * local_experts / 2 * 0.5)
    single = plan(m, resolve_layout(1, 1, "auto", -1, 1), "fp32", 4, 16)
    assert all(c.bytes_per_step == 0 for c in single.comm)


def test_gradient_accumulation_keeps_unsharded_grads():
    m = model_config("tiny", {})
    layout = resolve_layout(2, 1, "auto", -1, 1)
    one, four = (plan(m, layout, "fp32", 4, g).ranks[0] for g in (8, 32))
    assert one.accumulated_grads == 0
    assert four.accumulated_grads == 4 * sum(s.numel for s in model_params(m))
    assert (four.params, four.grads, four.optimizer) == (one.params, one.grads, one.optimizer)


# -- against the real trainer ---------------------------------------------------------------


def _train_one_step(rank: int, world: int, cfg_yaml: str) -> dict:
    """Train one step; -> every rank's param/grad/optimizer bytes as the trainer logs them,
    and the bytes autograd saved on rank 0."""
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    with CollectiveBytes() as sent:
        activations = train_step_saved_bytes(trainer)
    memory = [None] * world
    dist.all_gather_object(memory, trainer.peak_memory)
    return {"memory": memory, "activations": activations, "sent": sent.sent}


LAYOUTS = {
    "dp_shard=3, uneven shards": (3, []),
    "1 process, bf16": (1, ["train.precision=bf16"]),
    "ep=2 over dp_shard=2": (2, ["parallel.ep=2"]),
    "ep=2 x edp_shard=2": (4, ["parallel.ep=2"]),
    "dp_replicate=2 x dp_shard=2, ep=4": (4, ["parallel.dp_replicate=2", "parallel.ep=4"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_memory_estimate_within_10_percent_of_measured(name, tmp_path):
    world, overrides = LAYOUTS[name]
    cfg = one_step_config(tmp_path, world, overrides)
    result = run_ranks(_train_one_step, world, OmegaConf.to_yaml(cfg))[0]
    estimate = estimate_for(cfg, world)
    for rank, measured in enumerate(result["memory"]):
        mine = estimate.ranks[rank]
        assert mine.params == pytest.approx(measured["param_bytes"], rel=0.10), rank
        assert mine.grads == pytest.approx(measured["grad_bytes"], rel=0.10), rank
        assert mine.optimizer == pytest.approx(measured["optimizer_bytes"], rel=0.10), rank
    if estimate.layout.ep == 1:  # with EP, the rows a rank's experts receive depend on the routing
        assert saved_estimate(cfg, estimate) == pytest.approx(result["activations"], rel=0.10)
    assert fsdp_bytes(estimate.comm) == pytest.approx(result["sent"], rel=0.10)


# -- pipeline layouts ----------------------------------------------------------------------


def test_in_flight_microbatches_follow_the_schedule():
    n = 8
    assert in_flight_microbatches(build_schedule("gpipe", 4, n)) == {r: {r: n} for r in range(4)}
    # 1F1B: rank r starts pp - r forwards before its first backward, then alternates
    assert in_flight_microbatches(build_schedule("1f1b", 4, n)) == {r: {r: 4 - r} for r in range(4)}
    assert in_flight_microbatches(build_schedule("1f1b", 4, 2)) == {r: {r: min(2, 4 - r)} for r in range(4)}
    # DualPipeV: the V's first leg holds what the second leg has not yet given back
    assert in_flight_microbatches(build_schedule("dualpipev", 2, 4)) == {0: {0: 4, 3: 1}, 1: {1: 3, 2: 2}}
    # DualPipe: each copy carries half the micro-batches, mirror ranks hold the same
    dual = in_flight_microbatches(build_schedule("dualpipe", 4, n))
    assert dual[0] == dual[3] == {0: 4, 3: 1} and dual[1] == dual[2] == {1: 3, 2: 2}


def test_pipeline_activations_are_the_in_flight_stages_and_the_stage_cut():
    m = model_config("tiny", {})  # embed, 4 blocks, head + 1 MTP module; 8 micro-batches per step
    layout = resolve_layout(2, 2, "auto", -1, 1)
    one = piece_activation_bytes(m, 1, "bf16", "none", 1)
    first, last = plan(m, layout, "bf16", 1, 8, pp_schedule="1f1b").ranks
    assert first.activations == 2 * (one["embed"] + one["layers.0"] + one["layers.1"] + one["layers.2"])
    assert last.activations == one["layers.3"] + one["head"] + one["mtp.0"] + logits_bytes(m, 1)
    gpipe = plan(m, layout, "bf16", 1, 8, pp_schedule="gpipe").ranks
    assert gpipe[0].activations == 4 * first.activations and gpipe[1].activations > last.activations
    # the same pieces as pp=1 in all: the stages split the model's parameters between them
    whole = plan(m, resolve_layout(1, 1, "auto", -1, 1), "bf16", 1, 4).ranks[0]
    embed = FP32 * m.vocab_size * m.dim  # the last stage's copy for the MTP module
    assert first.params + last.params == whole.params + embed
    sends = {c.what: c.bytes_per_step for c in plan(m, layout, "bf16", 1, 8).comm}
    # 8 activations out of rank 0, 8 gradients out of rank 1, each [1, 128, 128] fp32
    assert sends["pipeline send: activations + grads, fwd + bwd"] == 8 * 128 * 128 * 4


def _pipeline_memory(rank: int, world: int, cfg_yaml: str) -> dict:
    """Build the trainer and train one step; -> its param/grad/optimizer bytes."""
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    trainer.train_step()
    return trainer.peak_memory


PIPELINE_LAYOUTS = {  # the harness model: embed, 3 blocks, head + 1 MTP module; 4 micro-batches per step
    "1f1b pp=2, the MTP embedding copy": (2, ["parallel.pp_schedule=1f1b"]),
    "dualpipev pp=2": (2, ["parallel.pp_schedule=dualpipev"]),
    "dualpipe pp=2, two copies": (2, ["parallel.pp_schedule=dualpipe"]),
    "dualpipe pp=2 x ep=2": (4, ["parallel.pp_schedule=dualpipe", "parallel.ep=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", PIPELINE_LAYOUTS)
def test_pipeline_memory_estimate_is_the_measured_bytes_per_rank(name, tmp_path):
    world, overrides = PIPELINE_LAYOUTS[name]
    cfg = make_config(tmp_path / "run", world, ["parallel.pp=2", f"train.global_batch_size={2 * world}", *overrides])
    measured = run_ranks(_pipeline_memory, world, OmegaConf.to_yaml(cfg))
    p, t = cfg.parallel, cfg.train
    layout = resolve_layout(world, p.pp, p.dp_replicate, p.dp_shard, p.ep)
    estimate = plan(cfg.model, layout, t.precision, t.micro_batch_size, t.global_batch_size, pp_schedule=p.pp_schedule)
    for rank, mine in enumerate(estimate.ranks):
        got = (measured[rank]["param_bytes"], measured[rank]["grad_bytes"], measured[rank]["optimizer_bytes"])
        assert (mine.params, mine.grads, mine.optimizer) == got, rank


# -- pipeline layouts against measurement: saved activations at their peak, FSDP collective bytes --


def gathered_bytes(units) -> int:
    """Bytes of the FSDP2 units' parameters that are gathered (unsharded) now (FSDP2's private
    parameter-group state, read through parallel/compat.py)."""
    from parallel.compat import fsdp_param_groups, fsdp_state

    groups = [group for unit in units for group in fsdp_param_groups(fsdp_state(unit))]
    return sum(
        p.unsharded_param.numel() * p.unsharded_param.element_size()
        for group in groups
        if group.is_unsharded
        for p in group.fsdp_params
    )


def _pipeline_step_measured(rank: int, world: int, cfg_yaml: str) -> dict:
    """Train one step; -> the peak of saved activation bytes, the FSDP collective bytes sent, and
    the most bytes of gathered parameters between two compute actions."""
    from framework.distributed import DistContext
    from framework.train import Trainer
    from parallel.pipeline import runtime

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    pipeline, gathered = trainer.pipeline, [0]

    def sample(*args, original):  # before each compute action, and before the step's reduction
        gathered[0] = max(gathered[0], gathered_bytes(pipeline.units))
        return original(*args)

    pipeline._wait_for_inputs = partial(sample, original=pipeline._wait_for_inputs)
    runtime.reduce_fsdp_gradients = partial(sample, original=runtime.reduce_fsdp_gradients)
    saved = LiveSavedBytes(trainer.model)
    with CollectiveBytes() as sent, torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        trainer.train_step()
    return {"peak_saved": saved.peak, "sent": sent.sent, "gathered": gathered[0]}


PIPELINE_MEASURED = {  # the harness model, pp=2 x dp_shard=2: 4 micro-batches per step
    "1f1b": ["parallel.pp_schedule=1f1b"],
    "dualpipev (B/W split)": ["parallel.pp_schedule=dualpipev"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", PIPELINE_MEASURED)
def test_pipeline_activations_and_fsdp_bytes_within_10_percent_of_measured(name, tmp_path):
    world = 4
    cfg = make_config(tmp_path / "run", world, ["parallel.pp=2", "parallel.dp_shard=2", *PIPELINE_MEASURED[name]])
    measured = run_ranks(_pipeline_step_measured, world, OmegaConf.to_yaml(cfg))
    p, t = cfg.parallel, cfg.train
    layout = resolve_layout(world, p.pp, p.dp_replicate, p.dp_shard, p.ep)
    # The saved-tensor hooks that measure keep every tensor until W (backward_split.py `_drop`):
    # the plan of a run under such hooks, B releasing nothing, is what they measure.
    estimate = plan(
        cfg.model,
        layout,
        t.precision,
        t.micro_batch_size,
        t.global_batch_size,
        pp_schedule=p.pp_schedule,
        release_after_b=False,
    )
    for rank, got in enumerate(measured):
        pp_rank = rank // layout.dp
        held = {n for _, names in estimate.pipeline[pp_rank].stages for n in names}
        logits = logits_bytes(cfg.model, t.micro_batch_size) if "head" in held else 0
        assert estimate.ranks[rank].activations - logits == pytest.approx(got["peak_saved"], rel=0.10), rank
        assert fsdp_bytes(estimate.pipeline_comm[pp_rank]) == pytest.approx(got["sent"], rel=0.10), rank
        # fp32: FSDP unsharded is the walk's most gathered at once (no bf16 gradient copies)
        assert estimate.ranks[rank].fsdp_in_flight == pytest.approx(got["gathered"], rel=0.10), rank


def test_pipeline_unit_walk_follows_fsdp2_under_the_runtime():
    # 1F1B stage 0 of 2, 4 micro-batches: F0 F1 B0 F2 B1 F3 B2 B3. A block is gathered by F0, F1
    # (each forward reshards it), B0, B1, B2 (each after a forward); F2, F3 and B3 find it gathered.
    schedule = build_schedule("1f1b", 2, 4)
    units = {"root": frozenset({0}), "layers.0": frozenset({0}), "layers.1": frozenset({0})}
    walk = pipeline_unit_walk(schedule, 0, units, {"root": 100, "layers.0": 10, "layers.1": 1}, frozenset({"root"}))
    assert walk.gathers == {"root": 1, "layers.0": 5, "layers.1": 5}
    assert walk.peak_gathered == 111  # after a backward: the root and the whole stage
    # zb1p, stage 0: F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3. B computes nothing there and W is the
    # whole backward: gathered by F0, F1, W0, W1, W2. Stage 1: F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3,
    # where W reads no weight: gathered by F0, B0, B1, B2, B3 (F1, F2, F3 follow a B).
    zb = build_schedule("zb1p", 2, 4)
    assert pipeline_unit_walk(zb, 0, {"layers.0": frozenset({0})}, {"layers.0": 1}).gathers == {"layers.0": 5}
    assert pipeline_unit_walk(zb, 1, {"layers.1": frozenset({1})}, {"layers.1": 1}).gathers == {"layers.1": 5}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("layer", ["0", "1"], ids=["dense", "moe"])
def test_kept_for_weight_bytes_within_10_percent_of_what_the_graph_holds_after_b(layer, checkpointing, precision):
    from parallel.activation_checkpoint import apply_activation_checkpointing
    from parallel.pipeline.backward_split import backward_input, backward_weight

    cfg = make_config(Path("unused"), 1, ["model.seq_len=64"])
    m = cfg.model
    model = MoETransformer(ModelArgs.from_config(m))
    model.init_weights(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    block = model.layers[layer].to(dtype)
    apply_activation_checkpointing([block], checkpointing)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    h = torch.randn(2, m.seq_len, m.dim, generator=torch.Generator().manual_seed(0))
    h_in = h.to(dtype).requires_grad_()
    out = block(h_in, model.rope_cos, model.rope_sin)
    graph = graph_nodes([out.grad_fn])
    _, pending = backward_input(out, torch.ones_like(out), h_in)
    held = sum(saved_storages(graph, params).values())
    expected = 2 * m.seq_len * block_kept_for_weight_bytes(m, layer != "0", precision)
    assert expected == pytest.approx(held, rel=0.10)
    backward_weight(pending)


def test_a_split_backward_holds_its_kept_bytes_from_b_to_w():
    # zb1p stage 1 of 2, 4 micro-batches: F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3. Each F adds 10,
    # each B leaves 3 of them until its W; stage 0's B computes nothing (its W frees all 10).
    zb = build_schedule("zb1p", 2, 4)
    assert peak_in_flight_bytes(zb, 1, {1: 10}) == 20  # B frees nothing: F0 F1 in flight
    assert peak_in_flight_bytes(zb, 1, {1: 10}, {1: 3}) == 13  # F1 on top of B0's 3
    assert peak_in_flight_bytes(zb, 0, {0: 10}, {0: 3}) == peak_in_flight_bytes(zb, 0, {0: 10})
    # checkpointing: a micro-batch keeps 1 until B, whose rerun leaves 3 until W (B0's and B1's at once)
    assert peak_in_flight_bytes(zb, 1, {1: 1}, {1: 3}) == 6
