"""Activation checkpointing: the same numbers as without it (one process, ep=2, pipeline schedules at pp=2
and pp=4, pp=2 x ep=2), the same parameter names, expert loads counted once, and less memory kept
(full < selective < none)."""

import weakref

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from framework.config import Config
from framework.loss import TrainingLoss
from framework.model.args import ModelArgs
from framework.model.transformer import MoETransformer
from parallel.activation_checkpoint import _selective_contexts, apply_activation_checkpointing
from scripts.benchlib import run_ranks
from tests.parallel.harness import PARITY_MODEL, make_config

MODES = ("none", "full", "selective")


def build(mode: str, overrides: tuple[str, ...] = ()) -> tuple[MoETransformer, TrainingLoss]:
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(PARITY_MODEL + list(overrides)))
    model = MoETransformer(ModelArgs.from_config(cfg.model))
    model.init_weights(0)
    apply_activation_checkpointing([*model.layers.values(), *(m.block for m in model.mtp)], mode)
    return model, TrainingLoss(cfg.model.mtp_weight)


def tokens(seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (2, seq_len + 1), generator=torch.Generator().manual_seed(1))


def test_names_unchanged_and_bad_mode_refused():
    names = {mode: list(build(mode)[0].state_dict()) for mode in MODES}
    assert names["full"] == names["none"] == names["selective"]
    with pytest.raises(ValueError, match="^train.activation_checkpointing=some: allowed: none, full, selective$"):
        build("some")


def test_one_forward_backward_is_bitwise_the_same_and_counts_once():
    results = {}
    for mode in MODES:
        model, loss_fn = build(mode)
        batch = tokens()
        loss = loss_fn(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        results[mode] = {
            "loss": loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "loads": [m.tokens_per_expert.clone() for m in model.moe_layers()],
            "aux": [m.last_aux_loss for m in model.moe_layers()],
        }
    ref = results["none"]
    assert all(g is not None for g in ref["grads"].values())
    for mode in ("full", "selective"):
        got = results[mode]
        assert torch.equal(got["loss"], ref["loss"])
        assert got["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            assert torch.equal(got["grads"][name], grad), f"{mode}: gradient of {name}"
        for a, b, aux_a, aux_b in zip(got["loads"], ref["loads"], got["aux"], ref["aux"], strict=True):
            assert torch.equal(a, b)  # not doubled by the recomputation
            assert torch.equal(aux_a, aux_b)


def test_selective_refuses_a_kept_output_changed_in_place():
    def block(x):
        y = x @ x
        y.mul_(2)  # a later in-place change: the kept matmul output would be stale in the rerun
        return y.sin()

    x = torch.randn(4, 4, requires_grad=True)
    out = checkpoint(block, x, use_reentrant=False, context_fn=_selective_contexts)
    with pytest.raises(RuntimeError, match=r"aten.mm.default's output was changed in place later"):
        out.sum().backward()


class _LiveStorages(TorchDispatchMode):
    """Remembers every storage an op creates, weakly: what is still alive after the forward is
    what autograd (or selective checkpointing's cache) keeps for the backward, plus the outputs."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.setdefault(storage.data_ptr(), weakref.ref(storage))
        return out

    def live_bytes(self) -> int:
        return sum(s.nbytes() for ref in self.storages.values() if (s := ref()) is not None)


def test_memory_kept_after_the_forward_full_below_selective_below_none():
    kept = {}
    for mode in MODES:
        model, loss_fn = build(mode, ("model.seq_len=64",))
        batch = tokens(64)
        with _LiveStorages() as live:
            loss = loss_fn(model(batch[:, :-1]), batch[:, 1:])
        kept[mode] = live.live_bytes()
        loss.backward()  # and the backward still runs
    assert kept["full"] < kept["selective"] < kept["none"], kept


# ---- the real trainer on gloo: each mode against none, over a few optimizer steps ----

STEPS = 3
LAYOUTS = {
    "one process": (1, []),
    "ep=2": (2, ["parallel.ep=2"]),
    "dualpipev pp=2": (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"]),
    "1f1b pp=2": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "dualpipev pp=4": (4, ["parallel.pp=4", "parallel.pp_schedule=dualpipev", "model.n_layers=7"]),  # 8 stages
    "dualpipev pp=2 x ep=2": (4, ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.ep=2"]),
}


def _train_each_mode(rank: int, world: int, cfg_yamls: dict[str, str]) -> dict:
    """Train STEPS steps once per mode in one process group; -> per mode: losses, grad norms,
    expert loads per step, final full weights (merged over the ranks by name)."""
    from framework.distributed import DistContext
    from framework.train import Trainer
    from parallel.full_state import full_state_dict

    results = {}
    for mode, cfg_yaml in cfg_yamls.items():
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
        trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
        losses, grad_norms, loads = [], [], []
        for _ in range(STEPS):
            loss, grad_norm = trainer.train_step()
            trainer.step += 1
            dist.all_reduce(loss)
            losses.append(loss.item() / world)
            grad_norms.append(grad_norm.item())
            loads.append(trainer.last_loads.clone())
        mine = {"state": full_state_dict(trainer.model), "loads": loads}
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        state = {k: v for part in gathered for k, v in part["state"].items()}
        results[mode] = {
            "losses": losses,
            "grad_norms": grad_norms,
            "loads": [part["loads"] for part in gathered],
            "state": state,
        }
    return results


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trainer_with_checkpointing_equals_without(layout, tmp_path):
    world, overrides = LAYOUTS[layout]
    cfgs = {
        mode: OmegaConf.to_yaml(
            make_config(tmp_path / mode, world, [*overrides, f"train.activation_checkpointing={mode}"])
        )
        for mode in MODES
    }
    results = run_ranks(_train_each_mode, world, cfgs)[0]
    ref = results["none"]
    assert ref["losses"][-1] < ref["losses"][0]  # it trained
    for mode in ("full", "selective"):
        got = results[mode]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-6, atol=0)
        for rank_got, rank_ref in zip(got["loads"], ref["loads"], strict=True):
            for a, b in zip(rank_got, rank_ref, strict=True):
                assert torch.equal(a, b), f"{mode}: expert loads differ"
        assert got["state"].keys() == ref["state"].keys()
        for key, value in ref["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
