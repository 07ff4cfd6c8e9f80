"""RoPE and the one score function every attention path uses (SPEC §3).

Queries carry the per-path scale and the learned temperature and the decoupled paths are
concatenated, so `q_cat . k_cat` *is* the SPEC score and attention runs with scale 1: training,
prefill, cached decode and analysis all compute the same scores. Mirrors torch_ref/layers.py.

Heads are grouped as (K kv-heads, G queries per kv-head) so gqa never materialises repeated K/V.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dba.config import ModelConfig

NEG_INF = float(jnp.finfo(jnp.float32).min)


def rope_cos_sin(rot_dim: int, base: float, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (T, rot_dim/2) for absolute positions, computed in fp32."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BHTD: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Split-halves rotation of the whole last dim: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    half = x_BHTD.shape[-1] // 2
    x1 = x_BHTD[..., :half].astype(jnp.float32)
    x2 = x_BHTD[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BHTD.dtype)


def split_heads(x_BTW: jax.Array, n_heads: int) -> jax.Array:
    """(B, T, H*hd) -> (B, H, T, hd): heads are contiguous slices."""
    b, t, w = x_BTW.shape
    return x_BTW.reshape(b, t, n_heads, w // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x_BHTD: jax.Array) -> jax.Array:
    b, h, t, d = x_BHTD.shape
    return x_BHTD.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def path_scales(cfg: ModelConfig) -> tuple[float, ...]:
    """Multipliers folded into the query of each score path (one path unless decoupled)."""
    if cfg.attn_mode != "decoupled":
        return (1.0 / math.sqrt(cfg.qk_dim // cfg.n_head),)
    ds, dg = cfg.sem_head_dim, cfg.geo_head_dim
    extra = 1.0 / math.sqrt(ds + dg) if cfg.decoupled_scale == "v29_sdpa" else 1.0
    return (extra / math.sqrt(ds), extra / math.sqrt(dg))


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


def attend(q_BHTD: jax.Array, k_BKLD: jax.Array, v_BKLD: jax.Array,
           null_kv: tuple[jax.Array, jax.Array] | None,
           dropout=None) -> jax.Array:
    """Causal attention with scale 1 over fresh K/V (K kv-heads); null key in front if given.

    Softmax in fp32; returns (B, H, T, Dv) in v's dtype.
    """
    b, h, t, _ = q_BHTD.shape
    n_kv, t_k = k_BKLD.shape[1], k_BKLD.shape[2]
    q = group_queries(q_BHTD, n_kv)
    s = jnp.where(causal_mask(t, t_k), scores(q, k_BKLD), NEG_INF)
    if null_kv is not None:
        k_null_HD, v_null_HD = null_kv
        g = h // n_kv
        s0 = null_scores(q, k_null_HD.reshape(n_kv, g, -1))[..., None]
        p = jax.nn.softmax(jnp.concatenate([s0, s], axis=-1), axis=-1)
        if dropout is not None:
            p = dropout(p)
        p = p.astype(v_BKLD.dtype)
        out = jnp.einsum("bkgtl,bkld->bkgtd", p[..., 1:], v_BKLD)
        out = out + p[..., :1] * v_null_HD.reshape(n_kv, g, 1, -1).astype(v_BKLD.dtype)[None]
    else:
        p = jax.nn.softmax(s, axis=-1)
        if dropout is not None:
            p = dropout(p)
        out = jnp.einsum("bkgtl,bkld->bkgtd", p.astype(v_BKLD.dtype), v_BKLD)
    return out.reshape(b, h, t, -1)
