"""FSDP2 mixed precision on real gloo ranks: bf16 compute, fp32 master weights and grads."""

import pytest
import torch
from omegaconf import OmegaConf

from scripts.benchlib import run_ranks
from tests.parallel.harness import make_config

pytestmark = pytest.mark.slow


def _bf16_training(rank: int, world: int, cfg_yaml: str) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    model = trainer.model
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = module.weight.dtype if hasattr(module, "weight") else module.w1.dtype

        return hook

    model.layers["1"].attn.wq.register_forward_pre_hook(record("block"))
    model.layers["1"].ffn.experts.register_forward_pre_hook(record("experts"))
    model.layers["1"].ffn.router.register_forward_pre_hook(record("router"))
    model.head.register_forward_pre_hook(record("head"))
    model.embed.register_forward_pre_hook(record("embed"))
    losses = [trainer.train_step()[0].item() for _ in range(15)]
    return {
        "compute": {k: str(v) for k, v in seen.items()},
        "master": sorted({str(p.dtype) for p in model.parameters()}),
        "first": losses[0],
        "last": sum(losses[-3:]) / 3,
    }


def test_bf16_compute_with_fp32_master_weights_trains(tmp_path):
    cfg = make_config(tmp_path, 2, ["parallel.ep=2", "train.precision=bf16", "model.dim=64", "model.expert_dim=32"])
    result = run_ranks(_bf16_training, 2, OmegaConf.to_yaml(cfg))[0]
    assert result["compute"] == {
        "block": "torch.bfloat16",
        "experts": "torch.bfloat16",
        "router": "torch.float32",
        "head": "torch.float32",
        "embed": "torch.float32",
    }
    assert result["master"] == ["torch.float32"]
    assert result["last"] < result["first"] - 0.3


def _find_outputs_like_torch_2_11() -> None:
    """torch 2.11's FSDP2 finds a unit's output tensors with tree_flatten, which does not
    look inside an unregistered dataclass; later versions walk dataclasses on their own.
    Make the installed torch search the 2.11 way, so the test guards every version."""
    import torch.distributed.fsdp._fully_shard._fsdp_state as fsdp_state
    from torch.utils._pytree import tree_flatten

    if hasattr(fsdp_state, "collect_grad_tensors"):
        fsdp_state.collect_grad_tensors = lambda output: tuple(
            t for t in tree_flatten(output)[0] if torch.is_tensor(t) and t.requires_grad
        )


def _router_unit_events(rank: int, world: int, cfg_yaml: str) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer

    _find_outputs_like_torch_2_11()
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    events = []
    for i, moe in enumerate(trainer.model.moe_layers()):
        state = moe.router._get_fsdp_state()
        group = state._fsdp_param_group

        def forward_done(module, args, output, i=i, group=group):
            events.append(("forward", i, group.is_unsharded))

        def pre_backward(grad, i=i, group=group, original=state._pre_backward):
            out = original(grad)
            events.append(("pre_backward", i, group.is_unsharded))
            return out

        def post_backward(*grads, i=i, group=group, original=group.post_backward):
            events.append(("post_backward", i, group.is_unsharded))
            return original(*grads)

        moe.router.register_forward_hook(forward_done)  # after FSDP's own post-forward (reshard)
        state._pre_backward = pre_backward  # the bound method FSDP hangs on the output tensors
        group.post_backward = post_backward  # reduce-scatters the router's gradient
    root = trainer.model._get_fsdp_state()

    def root_pre_backward(grad, original=root._pre_backward):
        events.append(("pre_backward", "root", True))
        return original(grad)

    root._pre_backward = root_pre_backward  # hung on LossOutput.loss, a dataclass field too
    loss, _ = trainer.train_step()
    return {"events": events, "layers": len(trainer.model.moe_layers()), "loss": loss.item()}


def test_bf16_router_unit_regathers_its_weight_before_backward(tmp_path):
    """Regression (bf16 crashed in the first backward on torch 2.11: "setStorage ... storage
    of size 0"): the router is its own fp32 FSDP unit and returns a Routing dataclass. With
    the output searched as torch 2.11 does, each router unit must still get its pre-backward
    hook: resharded after forward, unsharded again by its pre-backward, then reduced. The
    root unit returns a LossOutput dataclass: its pre-backward must run too."""
    cfg = make_config(tmp_path, 1, ["train.precision=bf16", "train.global_batch_size=1"])
    result = run_ranks(_router_unit_events, 1, OmegaConf.to_yaml(cfg))[0]
    assert result["layers"] == 3  # two MoE blocks and the MTP module's
    for i in range(result["layers"]):
        mine = [(what, unsharded) for what, layer, unsharded in result["events"] if layer == i]
        # One pre-backward call per routing tensor that reaches the loss (gate weights, scores).
        steps = [e for j, e in enumerate(mine) if j == 0 or e != mine[j - 1]]
        assert steps == [("forward", False), ("pre_backward", True), ("post_backward", True)], mine
    assert ("pre_backward", "root", True) in result["events"]
    assert torch.isfinite(torch.tensor(result["loss"]))


def _embedding_unit_events(rank: int, world: int, cfg_yaml: str) -> dict:
    from framework.config import Config
    from framework.distributed import DistContext
    from framework.train import Trainer

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(cfg_yaml))
    trainer = Trainer(cfg, DistContext(rank, world, rank, torch.device("cpu")))
    model, events = trainer.model, []
    embed, root = model.embed._get_fsdp_state(), model._get_fsdp_state()
    (group,) = [embed._fsdp_param_group] if hasattr(embed, "_fsdp_param_group") else embed._fsdp_param_groups
    (root_group,) = [root._fsdp_param_group] if hasattr(root, "_fsdp_param_group") else root._fsdp_param_groups

    def unshard(*args, original=group.unshard, **kwargs):
        events.append(("unshard", str(group._training_state).split(".")[-1], group.is_unsharded))
        return original(*args, **kwargs)

    group.unshard = unshard
    model.embed.register_forward_hook(lambda *_: events.append(("forward done", "", group.is_unsharded)))
    model.layers["0"].register_full_backward_hook(
        lambda *_: events.append(("block 0 backward", root_group.is_unsharded, group.is_unsharded))
    )
    grads = []

    def before_step(*args, original=trainer.optimizer.step, **kwargs):
        grads.append(model.embed.weight.grad.full_tensor())  # collective: every rank
        return original(*args, **kwargs)

    trainer.optimizer.step = before_step
    trainer.train_step()
    return {"events": events, "grad_norm": grads[0].norm().item(), "dtype": str(grads[0].dtype)}


def test_embedding_is_its_own_unit_gathered_for_its_forwards_only(tmp_path):
    """The embedding (fp32) is resharded after each forward call (the main one and the MTP
    module's) and never gathered for its backward, which reads only the token ids; the root
    (final norm, head) stays gathered into the backward. Its gradient still arrives, reduced."""
    cfg = make_config(tmp_path, 2, ["train.precision=bf16", "train.global_batch_size=2"])
    result = run_ranks(_embedding_unit_events, 2, OmegaConf.to_yaml(cfg))[0]
    # two forward calls, each gathers (FORWARD) and reshards; the backward's unshard returns at once
    gathers = [e for e in result["events"] if e[0] == "unshard" and e[1] == "FORWARD"]
    assert len(gathers) == 2, result["events"]
    assert [e for e in result["events"] if e[0] == "forward done"] == [("forward done", "", False)] * 2
    assert ("block 0 backward", True, False) in result["events"]  # head gathered, embedding not
    assert result["dtype"] == "torch.float32" and result["grad_norm"] > 0
