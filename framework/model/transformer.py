"""The MoE transformer: embedding, blocks (dense first, then MoE), norm, head, MTP modules.

Plain modules that run unchanged on one process; parallel/ shards and splits them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from framework.model.attention import Attention
from framework.model.ffn import SwiGLU
from framework.model.moe.layer import MoE
from framework.model.norm import RMSNorm
from framework.model.rope import rope_table
from parallel.compat import register_pytree_dataclass


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    ffn_dim: int
    num_experts: int
    num_shared_experts: int
    top_k: int
    expert_dim: int
    first_k_dense: int
    n_groups: int = 1
    topk_groups: int = 1
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    aux_loss_alpha: float = 0.0
    mtp_depth: int = 0
    mtp_weight: float = 0.3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @classmethod
    def from_config(cls, model_cfg) -> ModelArgs:
        names = cls.__dataclass_fields__
        return cls(**{k: model_cfg[k] for k in names if k in model_cfg})


@register_pytree_dataclass  # the root FSDP unit's output: FSDP2 must see `loss` to hook its backward
@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward() runs on
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor
    aux_loss: torch.Tensor


class Block(nn.Module):
    def __init__(self, args: ModelArgs, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args.dim, args.n_heads, args.n_kv_heads)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = (
            MoE(
                args.dim,
                args.num_experts,
                args.expert_dim,
                args.top_k,
                args.num_shared_experts,
                args.n_groups,
                args.topk_groups,
                args.score_func,
                args.route_scale,
                args.aux_loss_alpha,
            )
            if moe
            else SwiGLU(args.dim, args.ffn_dim)
        )

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = h + self.attn(self.attn_norm(h), cos, sin)
        if isinstance(self.ffn, MoE):
            out, aux = self.ffn(self.ffn_norm(h))
        else:
            out, aux = self.ffn(self.ffn_norm(h)), h.new_zeros((), dtype=torch.float32)
        return h + out, aux


class MTPModule(nn.Module):
    """Predicts one token further: mixes the previous depth's hidden state with the
    embedding of the next token, then runs one more block (DeepSeek-V3 MTP)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden_norm = RMSNorm(args.dim, args.norm_eps)
        self.embed_norm = RMSNorm(args.dim, args.norm_eps)
        self.proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(args, moe=args.n_layers > args.first_k_dense)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin):
        """-> hidden state for the next depth, its normed copy for the shared head, aux loss.
        The norm runs in here so a sharded module has its weights gathered when it does."""
        h = self.proj(torch.cat([self.hidden_norm(h_prev), self.embed_norm(emb_next)], dim=-1))
        h, aux = self.block(h, cos, sin)
        return h, self.norm(h), aux


class MoETransformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, moe=i >= args.first_k_dense) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(args) for _ in range(args.mtp_depth))
        cos, sin = rope_table(args.dim // args.n_heads, args.seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic from the seed alone, so every rank and layout starts identical."""
        gen = torch.Generator().manual_seed(seed)
        std = self.args.init_std
        out_std = std / math.sqrt(2 * (self.args.n_layers + self.args.mtp_depth))
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm scales
                continue
            is_output = name.endswith(("attn.wo.weight", "w2.weight", "experts.w2"))
            init = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, out_std if is_output else std, generator=gen)
            p.copy_(init)
        for moe in self.moe_layers():
            moe.router.expert_bias.zero_()
            moe.tokens_per_expert.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def logits(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Logits of the main model (no MTP), for inspection and generation on one process
        (a sharded model must go through forward(), where FSDP's hooks run)."""
        h, _ = self._trunk(tokens_BS)
        return self.head(self.norm(h))

    def _trunk(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(tokens_BS)
        aux = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, layer_aux = layer(h, self.rope_cos, self.rope_sin)
            aux = aux + layer_aux
        return h, aux

    def _cross_entropy(self, h_normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The head's weights may be fp32 while blocks compute in bf16; the loss is fp32.
        logits = self.head(h_normed.to(self.head.weight.dtype)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    def forward(self, batch_BS1: torch.Tensor) -> LossOutput:
        """The training loss. Each row holds seq_len + 1 tokens: inputs, then the targets
        shifted by one; the MTP modules read further into the same row."""
        inputs, targets = batch_BS1[:, :-1], batch_BS1[:, 1:]
        S = inputs.shape[1]
        h, aux = self._trunk(inputs)
        lm_loss = self._cross_entropy(self.norm(h), targets)
        mtp_loss = lm_loss.new_zeros(())
        for k, module in enumerate(self.mtp, start=1):
            # Depth k at position i sees token i+k and predicts token i+k+1.
            emb_next = self.embed(batch_BS1[:, k:S])
            h, h_normed, layer_aux = module(h[:, : S - k], emb_next, self.rope_cos, self.rope_sin)
            aux = aux + layer_aux
            mtp_loss = mtp_loss + self._cross_entropy(h_normed, batch_BS1[:, k + 1 : S + 1])
        if self.args.mtp_depth:
            mtp_loss = mtp_loss / self.args.mtp_depth
        loss = lm_loss + self.args.mtp_weight * mtp_loss + aux
        return LossOutput(loss, lm_loss.detach(), mtp_loss.detach(), aux.detach())
