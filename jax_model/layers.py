"""The model's attention math (SPEC §3): RoPE, heads, and the one score function every
attention path uses. Mirrors torch_ref/layers.py.

Queries carry the per-path scale and the learned temperature and the decoupled paths are
concatenated, so `q_cat . k_cat` *is* the SPEC score and attention runs with scale 1: training,
prefill, cached decode and analysis all compute the same scores (`scores`, `null_scores`,
`causal_mask`). Heads are grouped as (K kv-heads, G queries per kv-head) so gqa never
materialises repeated K/V. Fresh causal attention over these scores is `attention_kernels.attend`;
attention over a cache is `cached_attention.cached_attend`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float(jnp.finfo(jnp.float32).min)


def rope_cos_sin(rot_dim: int, base: float, positions: jax.Array,
                 inv_freq: tuple | None = None) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (T, rot_dim/2) for absolute positions, computed in fp32. `inv_freq`: the
    frequencies when they are not the default 1 / base^(2i/rot_dim) (dba/rope.py's table): one
    row, or a row per head, which gives per-head tables (heads, T, rot_dim/2)."""
    if inv_freq is None:
        freqs = 1.0 / (base ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    else:
        freqs = jnp.asarray(inv_freq, jnp.float32)
    angles = positions.astype(jnp.float32)[:, None] * freqs[..., None, :]
    # The barrier materialises the small tables: otherwise XLA fuses cos/sin into every consumer
    # and evaluates them once per (batch, head, position, dim) element.
    return jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))


def apply_rope(x_BHTD: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Split-halves rotation of the whole last dim: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    half = x_BHTD.shape[-1] // 2
    x1 = x_BHTD[..., :half].astype(jnp.float32)
    x2 = x_BHTD[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BHTD.dtype)


def hadamard(x: jax.Array, n: int) -> jax.Array:
    """The unnormalised Walsh-Hadamard transform of every n-channel slice of the last dim (n a
    power of two dividing it): x @ H_n per head, H_n the Sylvester matrix (scipy's `hadamard`).

    Written as log2(n) butterfly stages of exact IEEE adds (a+b, a-b; pairs 1, 2, 4, ... apart),
    no multiplies and no matmul, so torch_ref.layers.hadamard gives the same bits (a rotated key
    stream's quantized bytes must match across frameworks)."""
    lead, w = x.shape[:-1], x.shape[-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, w // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, w)
        h *= 2
    return x


def split_heads(x_BTW: jax.Array, n_heads: int) -> jax.Array:
    """(B, T, H*hd) -> (B, H, T, hd): heads are contiguous slices."""
    b, t, w = x_BTW.shape
    return x_BTW.reshape(b, t, n_heads, w // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x_BHTD: jax.Array) -> jax.Array:
    b, h, t, d = x_BHTD.shape
    return x_BHTD.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def kv_heads(streams: dict[str, jax.Array], key_names: tuple[str, ...],
             n_kv: int) -> tuple[jax.Array, jax.Array]:
    """Streams (B, L, width) -> k_cat, v (B, K, L, D) over the K kv-heads (no repetition): each
    head's slices of the key streams `key_names` concatenated in that order, as in q_cat."""
    keys = [split_heads(streams[name], n_kv) for name in key_names]
    k = keys[0] if len(keys) == 1 else jnp.concatenate(keys, axis=-1)
    return k, split_heads(streams["v"], n_kv)


def group_queries(q_BHTD: jax.Array, n_kv: int) -> jax.Array:
    """(B, H, T, D) -> (B, K, G, T, D): query head h uses kv head h // G."""
    b, h, t, d = q_BHTD.shape
    return q_BHTD.reshape(b, n_kv, h // n_kv, t, d)


def scores(q_BKGTD: jax.Array, k_BKLD: jax.Array) -> jax.Array:
    """fp32 scores (B, K, G, T, L) whatever the compute dtype."""
    return jnp.einsum("bkgtd,bkld->bkgtl", q_BKGTD, k_BKLD.astype(q_BKGTD.dtype),
                      preferred_element_type=jnp.float32)


def null_scores(q_BKGTD: jax.Array, k_null_KGD: jax.Array) -> jax.Array:
    return jnp.einsum("bkgtd,kgd->bkgt", q_BKGTD, k_null_KGD.astype(q_BKGTD.dtype),
                      preferred_element_type=jnp.float32)


def causal_mask(t_q: int, t_k: int) -> jax.Array:
    """Bool (Tq, Tk): query i (at absolute position t_k - t_q + i) sees keys <= its position."""
    q_pos = jnp.arange(t_k - t_q, t_k)
    return jnp.arange(t_k)[None, :] <= q_pos[:, None]
