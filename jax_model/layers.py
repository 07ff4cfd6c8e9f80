"""RoPE and the one score function every attention path uses (SPEC §3).

Queries carry the per-path scale and the learned temperature and the decoupled paths are
concatenated, so `q_cat . k_cat` *is* the SPEC score and attention runs with scale 1: training,
prefill, cached decode and analysis all compute the same scores. Mirrors torch_ref/layers.py.

Heads are grouped as (K kv-heads, G queries per kv-head) so gqa never materialises repeated K/V.

Also the matmuls every Linear and the tied output use (`dense`, `dense_t`), with a hand-written
backward that keeps XLA:CPU on its fast matmul path (see `dense`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from dba.errors import UserError

NEG_INF = float(jnp.finfo(jnp.float32).min)


# -- matmuls with a CPU-friendly backward ------------------------------------------------------
# XLA:CPU runs a dot on its fast (YNNPACK) path only when the left operand contracts its last
# dim. The weight gradient x^T @ dy contracts the token dim of both operands, so autodiff's dot
# falls back to a slower Eigen kernel or first transposes the *larger* operand (for the tied
# output that is the (B*T, V) logits gradient: a 64 MB copy on config A). Transposing the smaller
# operand behind an optimization barrier, so XLA cannot fold the transpose back into the dot,
# keeps every matmul of the backward on the fast path. Other backends get plain dots.


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _dot(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """a (M, K) times b contracted on its dim `contract_b`, accumulated in fp32, in a's dtype."""
    out = jax.lax.dot_general(a, b.astype(a.dtype), (((1,), (contract_b,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return out.astype(a.dtype)


def dot_rows(a: jax.Array, b_KO: jax.Array) -> jax.Array:
    """a (M, K) @ b (K, O) with b contracted on its rows, fp32 accumulation, in a's dtype."""
    return _dot(a, b_KO, 0)


def _swap(x: jax.Array) -> jax.Array:
    """The last two dims transposed and materialised (the barrier stops XLA folding it away)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def tn_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T b over the rows: a (..., N, A), b (..., N, B) -> (..., A, B) fp32, on the fast path.

    Transposes whichever operand is smaller (the other is often a big activation or a (T, L)
    probability block); if that is b, the (B, A) product is transposed back, which is cheap
    because A and B are small next to N.
    """
    b = b.astype(a.dtype)
    if not _on_cpu():
        return jnp.einsum("...na,...nb->...ab", a, b, preferred_element_type=jnp.float32)
    if a.shape[-1] <= b.shape[-1]:
        return jnp.matmul(_swap(a), b, preferred_element_type=jnp.float32)
    # The barrier sits between the dot and the transpose back: XLA would otherwise fold that
    # transpose into the dot as a contraction over the rows of `a`, the slow path again (the
    # tied output's weight gradient: 68 -> 44 ms on config A).
    return jnp.swapaxes(jax.lax.optimization_barrier(
        jnp.matmul(_swap(b), a, preferred_element_type=jnp.float32)), -1, -2)


@jax.custom_vjp
def _dense_cpu(x_NI: jax.Array, w_IO: jax.Array) -> jax.Array:
    return x_NI @ w_IO


def _dense_fwd(x_NI, w_IO):
    return x_NI @ w_IO, (x_NI, w_IO)


def _dense_bwd(res, dy_NO):
    x_NI, w_IO = res
    dy_NO = dy_NO.astype(x_NI.dtype)
    return _dot(dy_NO, w_IO, 1), tn_matmul(x_NI, dy_NO).astype(w_IO.dtype)


_dense_cpu.defvjp(_dense_fwd, _dense_bwd)


def env_int(name: str, default: int | None = None) -> int | None:
    """A non-negative integer from the environment (`default` when unset); a one-line UserError
    naming the variable and value otherwise."""
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit():
        raise UserError(f"{name}={value!r}: expected a non-negative integer")
    return int(value)


# The tied output projection: its logits gradient arrives in fp32 (the loss is fp32) and is cast
# to the operands' dtype before its two matmuls, so under bf16 compute they run as bf16 GEMMs
# (autodiff would run them in fp32). On accelerators the vocab is zero-padded to a multiple of
# VOCAB_PAD for the matmuls: an odd vocab (50257) leaves cuBLAS with unaligned, slow kernels.
VOCAB_PAD = env_int("DBA_VOCAB_PAD", 128)


def vocab_pad(n_vocab: int) -> int:
    """Zero rows appended to a (V, E) output projection for its matmuls (0 on CPU)."""
    return 0 if _on_cpu() or VOCAB_PAD <= 1 else -n_vocab % VOCAB_PAD


def pad_vocab(w_VE: jax.Array) -> jax.Array:
    """w with `vocab_pad` zero rows appended (w itself when there are none)."""
    pad = vocab_pad(w_VE.shape[0])
    return jnp.pad(w_VE, ((0, pad), (0, 0))) if pad else w_VE


def padded_logits(x_NE: jax.Array, w_VE: jax.Array) -> jax.Array:
    """fp32 (N, V + vocab_pad) = x @ pad_vocab(w)^T; the pad columns are 0."""
    return jax.lax.dot_general(x_NE, pad_vocab(w_VE), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _dense_t(x_NI: jax.Array, w_OI: jax.Array) -> jax.Array:
    return padded_logits(x_NI, w_OI)[:, :w_OI.shape[0]]


def _dense_t_fwd(x_NI, w_OI):
    return _dense_t(x_NI, w_OI), (x_NI, w_OI)


def _dense_t_bwd(res, dy_NO):
    x_NI, w_OI = res
    w = pad_vocab(w_OI)
    dy = dy_NO.astype(x_NI.dtype)
    if w.shape[0] != w_OI.shape[0]:
        dy = jnp.pad(dy, ((0, 0), (0, w.shape[0] - w_OI.shape[0])))
    # tn_matmul transposes x and the (O, I) product, never the (N, O) logits gradient.
    return dot_rows(dy, w), tn_matmul(dy, x_NI)[:w_OI.shape[0]].astype(w_OI.dtype)


_dense_t.defvjp(_dense_t_fwd, _dense_t_bwd)


def dense(x: jax.Array, w_IO: jax.Array) -> jax.Array:
    """x (..., I) @ w (I, O) -> (..., O), in x's dtype (operands already in the compute dtype).

    Leading dims are flattened: XLA:CPU's gradient of a dot with a (B, T, C) operand is several
    times slower than the same dot on (B*T, C).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _dense_cpu(x2, w_IO) if _on_cpu() else x2 @ w_IO
    return y.reshape(*lead, w_IO.shape[1])


def dense_t(x: jax.Array, w_OI: jax.Array) -> jax.Array:
    """x (..., I) @ w (O, I)^T -> (..., O) in fp32: the tied output projection."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    return _dense_t(x2, w_OI).reshape(*lead, w_OI.shape[0])


def rope_cos_sin(rot_dim: int, base: float, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (T, rot_dim/2) for absolute positions, computed in fp32."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
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


# Fresh causal attention skips the key blocks wholly above the diagonal: queries go in chunks
# of at least _MIN_CHUNK and chunk i attends only keys [0, end_i). With _N_CHUNKS = 4 that is
# 62.5% of the T x T scores; the score/softmax passes are memory-bound, so the attention's
# forward + backward drops by a quarter (more chunks: smaller, less efficient ops).
_N_CHUNKS = 4
_MIN_CHUNK = 32
# Without a backward, smaller chunks win: less of the triangle and blocks nearer cache size
# (2048-token prefill, 2 CPU cores: 4 chunks 53, 8 chunks 38, 16 chunks 36 ms per layer).
INFERENCE_CHUNKS = 16


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
