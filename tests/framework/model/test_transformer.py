import math

import torch

from framework.loss import TrainingLoss
from framework.model.args import ModelArgs
from framework.model.moe.layer import MoE
from framework.model.transformer import MoETransformer

ARGS = ModelArgs(
    dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=16, ffn_dim=48,
    num_experts=4, num_shared_experts=1, top_k=2, expert_dim=16, first_k_dense=1,
    n_groups=2, topk_groups=1, aux_loss_alpha=0.001, mtp_depth=2,
)  # fmt: skip


def _model(args=ARGS, seed=0):
    model = MoETransformer(args)
    model.init_weights(seed)
    return model


def _batch(args=ARGS, batch=3, seed=0):
    return torch.randint(0, args.vocab_size, (batch, args.seq_len + 1), generator=torch.Generator().manual_seed(seed))


def test_layers_are_dense_then_moe_and_mtp_modules_exist():
    model = _model()
    kinds = [isinstance(layer.ffn, MoE) for layer in model.layers.values()]
    assert kinds == [False, True, True]
    assert len(model.mtp) == 2
    assert len(model.moe_layers()) == 2 + 2  # trunk MoE blocks + one per MTP module


def _loss(model, batch_BS1):
    return TrainingLoss(ARGS.mtp_weight)(model(batch_BS1[:, :-1]), batch_BS1[:, 1:])


def _lm_loss(model, batch_BS1):
    loss_fn = TrainingLoss(ARGS.mtp_weight)
    loss_fn(model(batch_BS1[:, :-1]), batch_BS1[:, 1:])
    return loss_fn.pop_lm_loss()


def test_forward_shapes_and_initial_loss_near_uniform():
    model = _model()
    batch = _batch()
    outputs = model(batch[:, :-1])
    S, V = ARGS.seq_len, ARGS.vocab_size
    assert [o.shape for o in outputs] == [(3, S, V), (3, S - 1, V), (3, S - 2, V)]
    assert all(o.dtype == torch.float32 for o in outputs)
    loss_fn = TrainingLoss(ARGS.mtp_weight)
    loss = loss_fn(outputs, batch[:, 1:])
    lm = loss_fn.pop_lm_loss()
    assert abs(lm.item() - math.log(V)) < 0.1
    ce = torch.nn.functional.cross_entropy
    mtp = [ce(outputs[k].reshape(-1, V), batch[:, 1 + k :].reshape(-1)) for k in (1, 2)]
    torch.testing.assert_close(loss.detach(), lm + ARGS.mtp_weight * (mtp[0] + mtp[1]) / 2)
    assert all(m.last_aux_loss.item() > 0 for m in model.moe_layers())  # alpha > 0 while training


def test_aux_loss_reaches_the_router_through_the_block_output():
    """The aux loss is not in the returned loss; its gradient still flows (attach_aux_loss)."""
    batch = _batch()
    grads = {}
    for alpha in (0.0, 0.5):
        model = _model(ARGS.__class__(**{**ARGS.__dict__, "aux_loss_alpha": alpha}))
        _loss(model, batch).backward()
        grads[alpha] = model.layers["1"].ffn.router.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.5])


def test_every_parameter_gets_a_gradient():
    model = _model()
    _loss(model, _batch()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_init_is_deterministic_from_the_seed():
    a, b, c = _model(seed=1), _model(seed=1), _model(seed=2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_causal_later_tokens_do_not_change_earlier_logits():
    model = _model()
    batch = _batch()[:, :-1]
    changed = batch.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % ARGS.vocab_size
    torch.testing.assert_close(model(batch)[0][:, :10], model(changed)[0][:, :10], rtol=1e-5, atol=1e-5)


def test_a_few_steps_of_adamw_fit_a_fixed_batch():
    model = _model()
    batch = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = _lm_loss(model, batch).item()
    for _ in range(30):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    assert _lm_loss(model, batch).item() < first - 1.0


def test_bf16_autocast_runs_and_stays_close():
    model = _model()
    batch = _batch()
    ref = _lm_loss(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, batch)
        lm = _lm_loss(model, batch)
    assert loss.dtype == torch.float32
    assert abs(lm.item() - ref.item()) < 0.05


def test_meta_build_then_init_equals_a_plain_build():
    """The trainer builds on the meta device and materialises later: same values, bitwise."""
    plain = _model(seed=3)
    with torch.device("meta"):
        meta = MoETransformer(ARGS)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(3)
    for (name, a), b in zip(plain.named_parameters(), meta.parameters(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(plain.named_buffers(), meta.buffers(), strict=True):
        assert torch.equal(a, b), name


def test_model_args_are_the_config_schema_and_read_a_run_config_whole():
    from omegaconf import OmegaConf

    from framework.config import Config

    model_cfg = OmegaConf.structured(Config).model
    assert OmegaConf.get_type(model_cfg) is ModelArgs
    model_cfg.dim = 48
    assert ModelArgs.from_config(model_cfg) == ModelArgs(dim=48)
