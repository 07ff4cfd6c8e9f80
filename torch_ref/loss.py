"""The training loss: mean next-token cross-entropy in fp32. Mirrors jax_model/loss.py, whose
`linear_cross_entropy` fuses the same loss with the output projection for speed; torch runs the
plain formula on the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32."""
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), targets_BT.reshape(-1).long())
