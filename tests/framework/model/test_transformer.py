import math

import torch

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
    kinds = [isinstance(layer.ffn, MoE) for layer in model.layers]
    assert kinds == [False, True, True]
    assert len(model.mtp) == 2
    assert len(model.moe_layers()) == 2 + 2  # trunk MoE blocks + one per MTP module


def test_forward_shapes_and_initial_loss_near_uniform():
    model = _model()
    batch = _batch()
    logits = model.logits(batch[:, :-1])
    assert logits.shape == (3, ARGS.seq_len, ARGS.vocab_size)
    out = model(batch)
    assert abs(out.lm_loss.item() - math.log(ARGS.vocab_size)) < 0.1
    assert out.mtp_loss.item() > 0 and out.aux_loss.item() > 0
    expected = out.lm_loss + ARGS.mtp_weight * out.mtp_loss + out.aux_loss
    torch.testing.assert_close(out.loss.detach(), expected)


def test_every_parameter_gets_a_gradient():
    model = _model()
    model(_batch()).loss.backward()
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
    torch.testing.assert_close(model.logits(batch)[:, :10], model.logits(changed)[:, :10], rtol=1e-5, atol=1e-5)


def test_a_few_steps_of_adamw_fit_a_fixed_batch():
    model = _model()
    batch = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch).lm_loss.item()
    for _ in range(30):
        opt.zero_grad()
        model(batch).loss.backward()
        opt.step()
    assert model(batch).lm_loss.item() < first - 1.0


def test_bf16_autocast_runs_and_stays_close():
    model = _model()
    batch = _batch()
    ref = model(batch).lm_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out.loss.dtype == torch.float32
    assert abs(out.lm_loss.item() - ref.item()) < 0.05


def test_model_args_are_the_config_schema_and_read_a_run_config_whole():
    from omegaconf import OmegaConf

    from framework.config import Config

    model_cfg = OmegaConf.structured(Config).model
    assert OmegaConf.get_type(model_cfg) is ModelArgs
    model_cfg.dim = 48
    assert ModelArgs.from_config(model_cfg) == ModelArgs(dim=48)
