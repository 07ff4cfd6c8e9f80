"""Calibration statistics for upcycling (dba/upcycle.py): each layer's attention input moment
E[x x^T], x = [ln1 output, 1], over calibration tokens. Mirrors jax_model/calibrate.py."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from torch_ref.model import DBAModel


@torch.no_grad()
def _moments(model: DBAModel, idx_BT: torch.Tensor) -> torch.Tensor:
    """(n_layer, d + 1, d + 1) sums of x x^T over the batch's positions (fp64 accumulation)."""
    positions = torch.arange(idx_BT.shape[1], device=idx_BT.device)
    x = model.embed(idx_BT)
    sums = []
    for block in model.blocks:
        a = block.ln1(x).double().reshape(-1, x.shape[-1])
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
        sums.append(a.T @ a)
        x, _ = block(x, positions)
    return torch.stack(sums)


def attention_input_moments(model: DBAModel, tokens_NT: np.ndarray, batch: int = 1,
                            on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """E[x x^T] per layer (n_layer, d + 1, d + 1) float64 over every position of the sequences
    tokens (N, T), `batch` sequences at a time; `on_batch(n)` after each (progress)."""
    device = next(model.parameters()).device
    total = None
    for i in range(0, len(tokens_NT), batch):
        idx = torch.as_tensor(np.asarray(tokens_NT[i:i + batch]), dtype=torch.long, device=device)
        part = _moments(model, idx).cpu().numpy()
        total = part if total is None else total + part
        if on_batch is not None:
            on_batch(idx.shape[0])
    return total / (tokens_NT.shape[0] * tokens_NT.shape[1])
