"""The MoE transformer: embedding, blocks (dense first, then MoE), norm, head, MTP modules.

Plain modules that run unchanged on one process; parallel/ shards and splits them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from framework.model.args import ModelArgs
from framework.model.attention import Attention
from framework.model.ffn import SwiGLU
from framework.model.init_blocks import fill_normal_rows
from framework.model.moe.layer import MoE
from framework.model.norm import RMSNorm
from framework.model.rope import rope_table
from parallel.sharded_init import local_rows


class Block(nn.Module):
    def __init__(self, args: ModelArgs, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = MoE(args) if moe else SwiGLU(args.dim, args.ffn_dim)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One tensor in, one out: an MoE block's auxiliary loss rides on its output's backward."""
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.ffn(self.ffn_norm(h))


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
        """-> hidden state for the next depth, its normed copy for the shared head.
        The norm runs in here so a sharded module has its weights gathered when it does."""
        h = self.proj(torch.cat([self.hidden_norm(h_prev), self.embed_norm(emb_next)], dim=-1))
        h = self.block(h, cos, sin)
        return h, self.norm(h)


class MoETransformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        # Keyed "0".."n-1" (the same FQNs as a list) so a pipeline stage can drop other stages'
        # blocks and keep its own under their global names (parallel/pipeline/stage.py).
        self.layers = nn.ModuleDict({str(i): Block(args, moe=i >= args.first_k_dense) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(args) for _ in range(args.mtp_depth))
        cos, sin = rope_table(args.dim // args.n_heads, args.seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic from the seed and each parameter's name alone, so every rank and
        layout starts identical. Works on a plain model and on one whose parameters are
        shards (DTensors materialised from the meta device): each rank draws only the row
        blocks its shard touches (init_blocks), never a whole model."""
        std = self.args.init_std
        out_std = std / math.sqrt(2 * (self.args.n_layers + self.args.mtp_depth))
        for name, p in self.named_parameters():
            local, first_row = local_rows(p)
            if p.ndim == 1:
                local.fill_(1.0)  # norm scales
                continue
            is_output = name.endswith(("attn.wo.weight", "w2.weight", "experts.w2"))
            fill_normal_rows(local, first_row, tuple(p.shape), out_std if is_output else std, seed, name)
        cos, sin = rope_table(self.args.dim // self.args.n_heads, self.args.seq_len, self.args.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers():
            moe.router.expert_bias.zero_()
            moe.tokens_per_expert.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(
        self, tokens_BS: torch.Tensor, h_BSD: torch.Tensor | None = None, pieces: frozenset[str] | None = None
    ) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """-> (main logits [B, S, V], then depth k's MTP logits [B, S-k, V] for k = 1..mtp_depth),
        fp32. Depth k at position i sees token i+k and predicts token i+k+1, so it reads only
        the inputs; the loss (framework/loss.py) pairs each with its shifted targets.

        A pipeline stage runs only its `pieces` ("embed", "layers.i", "head" (with the final
        norm and the MTP modules)): it starts from `h_BSD`, the previous stage's output, unless
        it holds the embedding, and returns its hidden state [B, S, D] unless it holds the head."""
        S = tokens_BS.shape[1]
        h = self.embed(tokens_BS) if pieces is None or "embed" in pieces else h_BSD
        for name, layer in self.layers.items():
            if pieces is None or f"layers.{name}" in pieces:
                h = layer(h, self.rope_cos, self.rope_sin)
        if pieces is not None and "head" not in pieces:
            return h
        outputs = [self._head(self.norm(h))]
        for k, module in enumerate(self.mtp, start=1):
            emb_next = self.embed(tokens_BS[:, k:S])
            h, h_normed = module(h[:, : S - k], emb_next, self.rope_cos, self.rope_sin)
            outputs.append(self._head(h_normed))
        return tuple(outputs)

    def _head(self, h_normed: torch.Tensor) -> torch.Tensor:
        # The head's weights may be fp32 while blocks compute in bf16; the logits are fp32.
        return self.head(h_normed.to(self.head.weight.dtype)).float()
