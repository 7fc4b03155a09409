"""The training loss, outside the model: the last pipeline stage (or the plain loop) calls it
on the model's logits, so a schedule can own the backward.

Main next-token cross-entropy plus the MTP depths' mean, weighted; the MoE auxiliary loss
reaches the gradients through the blocks themselves (framework/model/moe/aux_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Per-token loss [B, S], fp32."""
    B, S, V = logits_BSV.shape
    return F.cross_entropy(logits_BSV.float().reshape(B * S, V), targets_BS.reshape(-1), reduction="none").view(B, S)


class TrainingLoss:
    """`loss_fn(outputs, targets_BS)`: outputs are (main logits [B, S, V], then depth k's
    MTP logits [B, S-k, V]); depth k predicts targets_BS[:, k:]. Keeps the detached main
    loss of every call since `pop_lm_loss()`, for the metrics."""

    def __init__(self, mtp_weight: float):
        self.mtp_weight = mtp_weight
        self._lm_losses: list[torch.Tensor] = []

    def __call__(self, outputs: tuple[torch.Tensor, ...], targets_BS: torch.Tensor) -> torch.Tensor:
        logits_BSV, *mtp_logits = outputs
        lm_loss = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))
        self._lm_losses.append(lm_loss.detach())
        if not mtp_logits:
            return lm_loss
        mtp_loss = lm_loss.new_zeros(())
        for k, logits_k in enumerate(mtp_logits, start=1):
            mtp_loss = mtp_loss + F.cross_entropy(
                logits_k.reshape(-1, logits_k.shape[-1]), targets_BS[:, k:].reshape(-1)
            )
        return lm_loss + self.mtp_weight * (mtp_loss / len(mtp_logits))

    def pop_lm_loss(self) -> torch.Tensor:
        """Mean main-model loss over the calls since the last pop (no host sync)."""
        losses, self._lm_losses = self._lm_losses, []
        return torch.stack(losses).mean()
