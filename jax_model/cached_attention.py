"""Attention over a KV cache (SPEC §5 "Decode reads the cache in blocks"): T queries against the
first `length` cached tokens, one block of `decode_block` keys at a time with an online softmax
(running max, denominator and output in fp32), so a long quantized cache is never dequantized
whole. Plain arguments, no modules: `Attention` calls it with its queries and its layer's
streams, as its default `cache_attend` (a fused kernel with the same signature can stand in).
Mirrors torch_ref/cached_attention.py.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_model import kvcache as kvc
from jax_model.layers import NEG_INF, group_queries, hadamard, kv_heads, null_scores, scores, split_heads

# What `Attention` takes as `cache_attend`: a function with `cached_attend`'s signature.
CacheAttend = Callable[..., jax.Array]

# Up to this many queries per row (decode: 1) the cached attention multiplies the blocks in
# their stored (B, n, width) layout by block-diagonal query matrices: plain 2-D matmuls, no
# per-block transpose into heads. It spends n_kv_head x the (tiny) FLOPs of a per-head dot, so
# long prompt chunks keep the per-head path. Decode on config A: 2.2x faster per cache block.
_NATURAL_MAX_T = 4


def rotate_queries(q_BHTD: jax.Array, streams: dict[str, kvc.StreamCache], key_names: tuple[str, ...],
                   n_kv: int) -> jax.Array:
    """q_cat with the slice of each rotated key stream (`StreamCache.rot_dim`) replaced by
    H q / n (n its head dim; 1/n is exact), so it scores against the stored H k exactly as q
    against k (H^T H = n I). q_cat itself when no stream is rotated: their program is unchanged."""
    if not any(streams[name].rot_dim for name in key_names):
        return q_BHTD
    parts, at = [], 0
    for name in key_names:
        s = streams[name]
        d = s.dim // n_kv
        x = q_BHTD[..., at:at + d]
        if s.rot_dim:
            if s.rot_dim != d:
                raise ValueError(f"stream {name}: rotated over {s.rot_dim} channels, but its head dim is {d}")
            x = (hadamard(x.astype(jnp.float32), d) * jnp.float32(1.0 / d)).astype(q_BHTD.dtype)
        parts.append(x)
        at += d
    return jnp.concatenate(parts, axis=-1)


def _natural_layout_ops(q: jax.Array, widths: dict[str, int], key_names: tuple[str, ...]):
    """(scores(block) -> (B, K, G, T, n) fp32, pv(p, v_block) -> (B, K, G, T, Dv) fp32) computed
    on blocks in their stored layout: scores = sum over key streams of block (B, n, K*d) @
    Q (B, K*d, K*G*T), with Q holding query (k, g, t) in the rows of kv-head k and zeros elsewhere.
    `widths`: each stream's width summed over the kv-heads."""
    b, n_kv, g, t, _ = q.shape
    eye = jnp.eye(n_kv, dtype=q.dtype)
    qx, at = {}, 0
    for name in key_names:
        d = widths[name] // n_kv
        qx[name] = jnp.einsum("bkgte,kj->bjekgt", q[..., at:at + d], eye).reshape(b, n_kv * d, n_kv * g * t)
        at += d

    def score_fn(block):  # block: name -> parts (kvcache.read_split)
        s = 0.0
        for name, x in qx.items():
            parts = block[name]
            n_parts, w = len(parts), parts[0].shape[-1]
            if n_parts * w > x.shape[1]:  # zero rows for the padding channels
                x = jnp.pad(x, ((0, 0), (0, n_parts * w - x.shape[1]), (0, 0)))
            for i, part in enumerate(parts):
                s = s + jnp.einsum("bnc,bcm->bnm", part.astype(q.dtype), x[:, i::n_parts],
                                   preferred_element_type=jnp.float32)
        return s.transpose(0, 2, 1).reshape(b, n_kv, g, t, -1)

    def pv_fn(p, v_parts):  # every query against every kv-head's values, then the matching head
        p = p.reshape(b, n_kv * g * t, -1)
        outs = [jnp.einsum("bmn,bnc->bmc", p, part.astype(jnp.float32)) for part in v_parts]
        full = outs[0] if len(outs) == 1 else jnp.stack(outs, -1).reshape(*outs[0].shape[:2], -1)
        full = full[..., :widths["v"]]
        return jnp.einsum("bkgtjd,kj->bkgtd", full.reshape(b, n_kv, g, t, n_kv, -1), eye.astype(jnp.float32))

    return score_fn, pv_fn


def cached_attend(q_BHTD: jax.Array, streams: dict[str, kvc.StreamCache], q_start: jax.Array,
                  length: jax.Array, null_kv: tuple[jax.Array, jax.Array] | None, *, n_kv_head: int,
                  key_names: tuple[str, ...], decode_block: int) -> jax.Array:
    """Attention of T queries q_cat (B, H, T, Dqk) at absolute positions q_start.. over the first
    `length` tokens of a layer's cached `streams` (key streams `key_names`, concatenated per head
    in q_cat's order, and "v"), one block of `decode_block` keys at a time (online softmax, fp32
    accumulators); `null_kv` the null key (H, Dqk) and value (H, Dv) per query head, or None.
    Returns (B, H, T, Dv) in q's dtype. Rotated key streams (`+rot`) are scored with rotated
    queries (`rotate_queries`); the null key is not rotated and scores against q itself.

    The residual window (the newest R tokens, exact fp16) is one more block read straight from
    the ring, and the blocks cover only the older, quantized positions: gathering the ring into
    every block cost more than the dequantization itself.
    """
    b, h, t, _ = q_BHTD.shape
    n_kv = n_kv_head
    g = h // n_kv
    max_len = next(iter(streams.values())).max_len
    blk = min(decode_block, max_len)
    q = group_queries(q_BHTD, n_kv)
    q_rot = rotate_queries(q_BHTD, streams, key_names, n_kv)
    q_keys = q if q_rot is q_BHTD else group_queries(q_rot, n_kv)  # scores the key streams
    q_pos = q_start + jnp.arange(t)
    dv = streams["v"].dim // n_kv
    rings = {s.residual for s in streams.values() if s.residual > 0}
    if len(rings) > 1:
        raise ValueError(f"streams of one layer have different residual windows: {sorted(rings)}")
    r = rings.pop() if rings else 0
    store_end = length - r  # positions below come from the blocks, the rest from the window

    natural = t <= _NATURAL_MAX_T
    if natural:
        score_fn, pv_fn = _natural_layout_ops(q_keys, {name: s.dim for name, s in streams.items()}, key_names)
    else:
        def score_fn(block):
            return scores(q_keys, kv_heads(block, key_names, n_kv)[0])

        def pv_fn(p, v_BNW):
            return jnp.einsum("bkgtl,bkld->bkgtd", p, split_heads(v_BNW, n_kv).astype(jnp.float32))

    if null_kv is None:
        m0 = jnp.full((b, n_kv, g, t), NEG_INF, jnp.float32)
        l0 = jnp.zeros((b, n_kv, g, t), jnp.float32)
        acc0 = jnp.zeros((b, n_kv, g, t, dv), jnp.float32)
    else:  # the null key is never masked: it seeds the running max, sum and output
        k_null, v_null = null_kv
        m0 = null_scores(q, k_null.reshape(n_kv, g, -1))
        l0 = jnp.ones_like(m0)
        acc0 = jnp.broadcast_to(v_null.reshape(n_kv, g, 1, dv).astype(jnp.float32)[None], (b, n_kv, g, t, dv))

    def update(carry, block, valid_TN):
        m, l, acc = carry
        s = jnp.where(valid_TN, score_fn(block), NEG_INF)  # (B, K, G, T, n)
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(valid_TN, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * corr + p.sum(-1)
        return m_new, l, acc * corr[..., None] + pv_fn(p, block["v"])

    def body(i, carry):
        nominal = i * blk
        start = jnp.minimum(nominal, max_len - blk)  # the last block may overlap the previous one
        if natural:
            block = {name: kvc.read_split(s, start, blk) for name, s in streams.items()}
        else:
            block = {name: kvc.read(s, start, blk, length, window=False) for name, s in streams.items()}
        k_pos = start + jnp.arange(blk)
        valid = (k_pos >= nominal) & (k_pos < store_end)
        return update(carry, block, valid[None, :] & (k_pos[None, :] <= q_pos[:, None]))

    if blk == max_len:  # one block covers the cache: no loop (on a GPU each trip costs a host sync)
        carry = body(0, (m0, l0, acc0))
    else:
        carry = jax.lax.fori_loop(0, (store_end + blk - 1) // blk, body, (m0, l0, acc0))
    if r:
        w_pos = kvc.window_positions(r, length)
        block = {name: kvc.read_window(s, r, length) for name, s in streams.items()}
        if natural:
            block = {name: (x,) for name, x in block.items()}
        carry = update(carry, block, (w_pos[None, :] >= 0) & (w_pos[None, :] <= q_pos[:, None]))
    _, l, acc = carry
    out = acc / l[..., None]
    return out.reshape(b, h, t, dv).astype(q_BHTD.dtype)
