"""Calibration statistics for upcycling (dba/upcycle.py): each layer's attention input moment
E[x x^T], x = [ln1 output, 1], over calibration tokens. Mirrors torch_ref/calibrate.py."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_model.model import DBAModel


@nnx.jit
def _moments(model: DBAModel, idx_BT: jax.Array) -> jax.Array:
    """(n_layer, d + 1, d + 1) sums of x x^T over the batch's positions, fp32 at full precision."""
    positions = jnp.arange(idx_BT.shape[1])
    x = model.embed(idx_BT)
    sums = []
    for block in model.blocks:
        a = block.ln1(x).astype(jnp.float32).reshape(-1, x.shape[-1])
        a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), jnp.float32)], axis=1)
        sums.append(jnp.dot(a.T, a, precision=jax.lax.Precision.HIGHEST))
        x, _ = block(x, positions)
    return jnp.stack(sums)


def attention_input_moments(model: DBAModel, tokens_NT: np.ndarray, batch: int = 1,
                            on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """E[x x^T] per layer (n_layer, d + 1, d + 1) float64 over every position of the sequences
    tokens (N, T), `batch` sequences at a time; `on_batch(n)` after each (progress)."""
    total = None
    for i in range(0, len(tokens_NT), batch):
        part = np.asarray(jax.device_get(_moments(model, model.as_tokens(tokens_NT[i:i + batch]))), np.float64)
        total = part if total is None else total + part
        if on_batch is not None:
            on_batch(len(tokens_NT[i:i + batch]))
    return total / (tokens_NT.shape[0] * tokens_NT.shape[1])
