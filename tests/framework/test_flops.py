"""The FLOP formula behind MFU, checked against a count by hand and against the built model."""

from dataclasses import replace

import pytest

from framework.flops import active_matmul_params, train_flops_per_token
from framework.model.args import ModelArgs
from framework.model.transformer import MoETransformer

# 3 blocks (1 dense, 2 MoE) and one MTP module, GQA (2 heads, 1 KV head).
TINY = ModelArgs(
    dim=8, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=32, seq_len=5, ffn_dim=16, num_experts=4,
    num_shared_experts=1, top_k=2, expert_dim=4, first_k_dense=1, mtp_depth=1,
)  # fmt: skip


def test_active_params_by_hand():
    attn = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8  # wq, wk, wv (1 KV head of size 4), wo
    dense = 3 * 8 * 16  # w1, w3, w2
    moe = (2 + 1) * 3 * 8 * 4 + 8 * 4  # top-2 routed + 1 shared expert, and the router
    trunk = 3 * attn + 1 * dense + 2 * moe
    mtp = attn + moe + 2 * 8 * 8  # its block (MoE) and the projection of [hidden; embedding]
    heads = 2 * 8 * 32  # the shared output head runs for the main model and the MTP depth
    assert (attn, dense, moe) == (192, 384, 320)
    assert active_matmul_params(TINY) == trunk + mtp + heads == 2752


def test_train_flops_per_token_by_hand():
    # 6 per active weight (forward 2, backward 4) + causal attention 6 x layers x seq x dim.
    assert train_flops_per_token(TINY) == 6 * 2752 + 6 * (3 + 1) * 5 * 8 == 17472


@pytest.mark.parametrize(
    "args",
    [TINY, replace(TINY, mtp_depth=0), replace(TINY, first_k_dense=3, mtp_depth=1), replace(TINY, top_k=4)],
    ids=["tiny", "no-mtp", "all-dense", "top-4"],
)
def test_active_params_match_the_built_model(args):
    """The weights a token multiplies through, read off the real modules: every matrix but
    the embedding (a lookup), routed experts at top_k / num_experts, the head once per depth."""
    model = MoETransformer(args)
    count = 0.0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name == "embed.weight":
            continue
        share = args.top_k / args.num_experts if ".experts.w" in name else 1.0
        count += p.numel() * share
    count += args.mtp_depth * model.head.weight.numel()
    assert active_matmul_params(args) == count
