"""How fresh causal attention is computed: `attend(q, k, v, null_kv)` is softmax(q . k with the
causal mask, null key in front) @ v over `layers`' one score function (`scores`, `null_scores`,
`causal_mask`); the functions here compute exactly that, faster than autodiff of the plain
formula. Used for training, the full forward and a prompt through an empty cache (a cache's
attention is `cached_attention`).

Why it exists, and what each piece was measured to buy (XLA:CPU, config A, unless said):
- causal block skipping: queries in chunks, each attending only the keys up to its end, so a
  quarter of the attention's forward + backward is saved (62.5% of the T x T scores computed);
  forward-only prompts use more, smaller chunks (2048-token prefill: 53 -> 36 ms per layer);
- a hand-written backward (`_attention`, flash-attention style): halves the attention backward;
  its forward normalises after P @ V (2048-token prefill attention 54 -> 38 ms per layer);
- on a GPU with bf16/fp16 activations, cuDNN's fused (flash) kernel through
  jax.nn.dot_product_attention (`DBA_ATTENTION`), which keeps the (T, T) blocks on chip.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from dba.errors import UserError
from jax_model.fast_matmul import tn_matmul
from jax_model.layers import NEG_INF, causal_mask, group_queries, null_scores, scores

# Fresh causal attention skips the key blocks wholly above the diagonal: queries go in chunks
# of at least _MIN_CHUNK and chunk i attends only keys [0, end_i). With _N_CHUNKS = 4 that is
# 62.5% of the T x T scores; the score/softmax passes are memory-bound, so the attention's
# forward + backward drops by a quarter (more chunks: smaller, less efficient ops).
_N_CHUNKS = 4
_MIN_CHUNK = 32
# Without a backward, smaller chunks win: less of the triangle and blocks nearer cache size
# (2048-token prefill, 2 CPU cores: 4 chunks 53, 8 chunks 38, 16 chunks 36 ms per layer).
INFERENCE_CHUNKS = 16


def attend(q_BHTD: jax.Array, k_BKLD: jax.Array, v_BKLD: jax.Array,
           null_kv: tuple[jax.Array, jax.Array] | None,
           dropout=None, n_chunks: int = _N_CHUNKS) -> jax.Array:
    """Causal attention with scale 1 over fresh K/V (K kv-heads); null key in front if given.

    Softmax in fp32; returns (B, H, T, Dv) in v's dtype. `n_chunks`: query chunks of the causal
    block skipping (more suit a forward-only long prompt, see `INFERENCE_CHUNKS`).
    """
    b, h, t, _ = q_BHTD.shape
    n_kv, t_k = k_BKLD.shape[1], k_BKLD.shape[2]
    if t == t_k and null_kv is None and dropout is None:
        impl = fused_attention_impl(q_BHTD.dtype)
        if impl is not None:
            return fused_attend(q_BHTD, k_BKLD, v_BKLD, impl)
    q = group_queries(q_BHTD, n_kv)
    chunk = max(_MIN_CHUNK, -(-t // n_chunks))
    if t != t_k or t < 2 * chunk:
        out = _attend_block(q, k_BKLD, v_BKLD, causal_mask(t, t_k), null_kv, dropout)
        return out.reshape(b, h, t, -1)
    # Materialise K and V once: without the barrier XLA fuses their whole construction (slice of
    # the projection, RoPE, concat) into every chunk's key slice, recomputing it per chunk.
    k_BKLD, v_BKLD = jax.lax.optimization_barrier((k_BKLD, v_BKLD))
    outs = []
    for s0 in range(0, t, chunk):  # t == t_k: chunk [s0, e) sees keys [0, e)
        e = min(s0 + chunk, t)
        mask = causal_mask(t, t_k)[s0:e, :e]
        outs.append(_attend_block(q[:, :, :, s0:e], k_BKLD[:, :, :e], v_BKLD[:, :, :e], mask, null_kv, dropout))
    return jnp.concatenate(outs, axis=3).reshape(b, h, t, -1)


# -- one block of grouped queries against its keys (the XLA path) --------------------------------

def _softmax_out(q: jax.Array, k_BKLD: jax.Array, v_BKLD: jax.Array, mask: jax.Array, null):
    """(out (B, K, G, T, Dv) in v's dtype, p (.., T, L) fp32, p_null (.., T) fp32 or None)."""
    s = jnp.where(mask, scores(q, k_BKLD), NEG_INF)
    if null is None:
        p, p0 = jax.nn.softmax(s, axis=-1), None
    else:
        s0 = null_scores(q, null[0])  # the null key: one more never-masked score per query
        m = jnp.maximum(s.max(-1), s0)
        e, e0 = jnp.exp(s - m[..., None]), jnp.exp(s0 - m)
        denom = e.sum(-1) + e0
        p, p0 = e / denom[..., None], e0 / denom
    out = jnp.einsum("bkgtl,bkld->bkgtd", p.astype(v_BKLD.dtype), v_BKLD)
    if p0 is not None:
        out = out + p0[..., None].astype(v_BKLD.dtype) * null[1].astype(v_BKLD.dtype)[None, :, :, None, :]
    return out, p, p0


# Attention's backward written out (as flash attention does): dS = P * (dP - rowsum(dO * O)) is
# one elementwise pass, where autodiff's softmax backward reduces over the whole (T, L) block, and
# dK, dV contract over queries with the small operand transposed instead of the (T, L) block.
# On config A this halves the attention backward on XLA:CPU. Mask and fp32 softmax as forward.
@jax.custom_vjp
def _attention(q, k_BKLD, v_BKLD, mask, null):
    # Not differentiated (prefill, evaluation): normalise after P@V, out = (E @ V) / rowsum(E),
    # which saves a pass over the (T, L) block; 2048-token prefill attention 54 -> 38 ms/layer.
    s = jnp.where(mask, scores(q, k_BKLD), NEG_INF)
    m = s.max(-1)
    if null is not None:
        s0 = null_scores(q, null[0])
        m = jnp.maximum(m, s0)
    e = jnp.exp(s - m[..., None])
    denom = e.sum(-1)
    out = jnp.einsum("bkgtl,bkld->bkgtd", e.astype(v_BKLD.dtype), v_BKLD, preferred_element_type=jnp.float32)
    if null is not None:
        e0 = jnp.exp(s0 - m)
        denom = denom + e0
        out = out + e0[..., None] * null[1].astype(jnp.float32)[None, :, :, None, :]
    return (out / denom[..., None]).astype(v_BKLD.dtype)


def _attention_fwd(q, k_BKLD, v_BKLD, mask, null):
    out, p, p0 = _softmax_out(q, k_BKLD, v_BKLD, mask, null)
    return out, (q, k_BKLD, v_BKLD, mask, null, out, p, p0)


def _attention_bwd(res, d_out):
    q, k, v, mask, null, out, p, p0 = res
    b, n_kv, g, t, _ = q.shape
    do = d_out.astype(v.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # = rowsum(dP * P)
    dp = jnp.einsum("bkgtd,bkld->bkgtl", do, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])  # zero where masked (p = 0)
    dq = jnp.einsum("bkgtl,bkld->bkgtd", ds.astype(q.dtype), k, preferred_element_type=jnp.float32)
    # dK, dV sum over the G query heads of a kv-head and over queries: rows (G*T).
    rows = lambda x: x.reshape(b, n_kv, g * t, x.shape[-1])  # noqa: E731
    dk = tn_matmul(rows(ds).astype(q.dtype), rows(q))  # transposes q, not the (T, L) block
    dv = tn_matmul(rows(p).astype(do.dtype), rows(do))
    d_null = None
    if null is not None:
        k_null, v_null = null
        dp0 = jnp.einsum("bkgtd,kgd->bkgt", do, v_null.astype(do.dtype), preferred_element_type=jnp.float32)
        ds0 = p0 * (dp0 - delta)
        dq = dq + ds0[..., None] * k_null.astype(jnp.float32)[None, :, :, None, :]
        d_null = (jnp.einsum("bkgt,bkgtd->kgd", ds0, q.astype(jnp.float32)).astype(k_null.dtype),
                  jnp.einsum("bkgt,bkgtd->kgd", p0, do.astype(jnp.float32)).astype(v_null.dtype))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, d_null


_attention.defvjp(_attention_fwd, _attention_bwd)


def _attend_block(q: jax.Array, k_BKLD: jax.Array, v_BKLD: jax.Array, mask: jax.Array,
                  null_kv: tuple[jax.Array, jax.Array] | None, dropout) -> jax.Array:
    """Grouped queries (B, K, G, T, D) over keys (B, K, L, D) with a bool (T, L) mask."""
    n_kv, g = q.shape[1], q.shape[2]
    null = None
    if null_kv is not None:
        null = (null_kv[0].reshape(n_kv, g, -1), null_kv[1].reshape(n_kv, g, -1))
    if dropout is None:
        return _attention(q, k_BKLD, v_BKLD, mask, null)
    # Dropout on the probabilities: the plain autodiff path.
    s = jnp.where(mask, scores(q, k_BKLD), NEG_INF)
    if null is not None:
        s0 = null_scores(q, null[0])[..., None]
        p = dropout(jax.nn.softmax(jnp.concatenate([s0, s], axis=-1), axis=-1)).astype(v_BKLD.dtype)
        out = jnp.einsum("bkgtl,bkld->bkgtd", p[..., 1:], v_BKLD)
        return out + p[..., :1] * null[1].astype(v_BKLD.dtype)[None, :, :, None, :]
    p = dropout(jax.nn.softmax(s, axis=-1))
    return jnp.einsum("bkgtl,bkld->bkgtd", p.astype(v_BKLD.dtype), v_BKLD)


# -- fused attention on accelerators -------------------------------------------------------------
# On a GPU the (T, T) score blocks of the XLA path above go through HBM several times per layer;
# a fused (flash) kernel keeps them on chip. DBA_ATTENTION picks the implementation of fresh causal
# attention without dropout or null key, read when a function is traced:
#   auto  (default) cuDNN's fused kernel on a GPU with bf16/fp16 activations, else the XLA path;
#   cudnn / xla     jax.nn.dot_product_attention with that implementation ("xla" is jax's
#                   reference version, which runs anywhere: the tests compare it with ours);
#   ours            always the XLA path above.
ATTENTION_IMPLS = ("auto", "cudnn", "xla", "ours")


def fused_attention_impl(dtype) -> str | None:
    """The jax.nn.dot_product_attention implementation to use for `dtype` activations, or None."""
    choice = os.environ.get("DBA_ATTENTION", "auto")
    if choice not in ATTENTION_IMPLS:
        raise UserError(f"DBA_ATTENTION={choice!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
    if choice == "auto":
        fused = jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
        return "cudnn" if fused else None
    return None if choice == "ours" else choice


def fused_attend(q_BHTD: jax.Array, k_BKLD: jax.Array, v_BKLD: jax.Array, impl: str) -> jax.Array:
    """Causal attention, scale 1, through jax.nn.dot_product_attention: (B, H, T, Dv) in v's dtype.

    The decoupled head dims (e.g. 4 + 8 = 12) are zero-padded to one multiple of 8 for q, k and v
    (cuDNN's rule); zeros add nothing to q.k and the padded output columns are dropped.
    """
    dqk, dv = q_BHTD.shape[-1], v_BKLD.shape[-1]
    d = -(-max(dqk, dv) // 8) * 8

    def btnh(x):
        x = jnp.pad(x.astype(q_BHTD.dtype), [(0, 0)] * 3 + [(0, d - x.shape[-1])])
        return x.transpose(0, 2, 1, 3)

    out = jax.nn.dot_product_attention(btnh(q_BHTD), btnh(k_BKLD), btnh(v_BKLD), scale=1.0, is_causal=True,
                                       implementation=impl)
    return out[..., :dv].transpose(0, 2, 1, 3).astype(v_BKLD.dtype)
