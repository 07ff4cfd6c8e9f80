"""Cached inference: prefill, the decode step, and teacher-forced `decode_logits` (SPEC §5).

Order of operations (v29's): a prompt through an *empty* cache attends over its own fresh K/V
and then stores them; every later call first appends its K/V and then attends over what the
cache returns (dequantized, newest tokens exact from the fp16 window). Cached attention streams
the cache in `decode_block` blocks with an online softmax, so a long quantized cache is never
expanded whole. Both steps are jitted with the cache as a pytree and the length as an array:
one compile per (batch, max_len, policy, prompt length), never one per token.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba.errors import UserError
from dba.generation import check_decode
from dba.kvspec import KVPolicy
from jax_model import kvcache as kvc
from jax_model.layers import NEG_INF, attend, group_queries, merge_heads, null_scores, scores
from jax_model.model import Attention, DBAModel


def cached_attend(attn: Attention, q_BHTD: jax.Array, streams: dict, q_start: jax.Array,
                  length: jax.Array, decode_block: int) -> jax.Array:
    """Attention of T queries (absolute positions q_start..) over the first `length` cached
    tokens, one block of `decode_block` keys at a time (online softmax, fp32 accumulators)."""
    b, h, t, _ = q_BHTD.shape
    n_kv = attn.cfg.n_kv_head
    g = h // n_kv
    max_len = next(iter(streams.values())).max_len
    blk = min(decode_block, max_len)
    q = group_queries(q_BHTD, n_kv)
    q_pos = q_start + jnp.arange(t)
    dv = attn.cfg.v_dim // h

    null = attn.null_kv()
    if null is None:
        m0 = jnp.full((b, n_kv, g, t), NEG_INF, jnp.float32)
        l0 = jnp.zeros((b, n_kv, g, t), jnp.float32)
        acc0 = jnp.zeros((b, n_kv, g, t, dv), jnp.float32)
    else:  # the null key is never masked: it seeds the running max, sum and output
        k_null, v_null = null
        m0 = null_scores(q, k_null.reshape(n_kv, g, -1))
        l0 = jnp.ones_like(m0)
        acc0 = jnp.broadcast_to(v_null.reshape(n_kv, g, 1, dv).astype(jnp.float32)[None], (b, n_kv, g, t, dv))

    def body(i, carry):
        m, l, acc = carry
        nominal = i * blk
        start = jnp.minimum(nominal, max_len - blk)  # the last block may overlap the previous one
        block = {name: kvc.read(s, start, blk, length) for name, s in streams.items()}
        k, v = attn.kv_heads(block)
        s = scores(q, k)  # (B, K, G, T, blk)
        k_pos = start + jnp.arange(blk)
        valid = (k_pos >= nominal) & (k_pos < length)
        valid = valid[None, :] & (k_pos[None, :] <= q_pos[:, None])  # (T, blk)
        s = jnp.where(valid, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgtl,bkld->bkgtd", p, v.astype(jnp.float32))
        return m_new, l, acc

    n_blocks = (length + blk - 1) // blk
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, (m0, l0, acc0))
    out = acc / l[..., None]
    return out.reshape(b, h, t, dv).astype(q_BHTD.dtype)


def _forward_cached(model: DBAModel, cache: kvc.Cache, tokens_BT: jax.Array, fresh: bool,
                    decode_block: int, last_only: bool = False) -> tuple[jax.Array, kvc.Cache]:
    t = tokens_BT.shape[1]
    start = cache.pos
    positions = start + jnp.arange(t)
    length = start + t
    x = model.embed(tokens_BT)
    new_layers = []
    for block, streams in zip(model.blocks, cache.layers):
        attn = block.attn
        hx = block.ln1(x)
        q = attn.queries(hx, positions)
        kv = attn.new_kv(hx, positions)
        streams = {name: kvc.write(s, kv[name], start) for name, s in streams.items()}
        if fresh:
            k, v = attn.kv_heads(kv)
            y = attend(q, k, v, attn.null_kv())
        else:
            y = cached_attend(attn, q, streams, start, length, decode_block)
        x = x + attn.out_proj(merge_heads(y)).astype(jnp.float32)
        x = x + block.ff(block.ln2(x)).astype(jnp.float32)
        new_layers.append(streams)
    if last_only:  # generation needs only the next-token logits, not the prompt's
        x = x[:, -1:]
    return model.unembed(x), cache.replace(layers=tuple(new_layers), pos=length)


@partial(nnx.jit, static_argnames=("fresh", "decode_block", "last_only"))
def prefill(model: DBAModel, cache: kvc.Cache, tokens_BT: jax.Array, *, fresh: bool = True,
            decode_block: int = 1024, last_only: bool = False) -> tuple[jax.Array, kvc.Cache]:
    """Run a prompt (or a further chunk of one) through the cache; logits (B, T, V), or
    (B, 1, V) for the last position only with `last_only`."""
    return _forward_cached(model, cache, tokens_BT, fresh, decode_block, last_only)


_prefill = prefill  # decode_logits' `prefill` argument shadows the name


@partial(nnx.jit, static_argnames=("decode_block",))
def decode_step(model: DBAModel, cache: kvc.Cache, token_B: jax.Array, *,
                decode_block: int = 1024) -> tuple[jax.Array, kvc.Cache]:
    """One new token per row: append its K/V, attend over the cache; logits (B, V)."""
    logits, cache = _forward_cached(model, cache, token_B[:, None], False, decode_block)
    return logits[:, 0], cache


@partial(nnx.jit, static_argnames=("decode_block",))
def _teacher_forced(model: DBAModel, cache: kvc.Cache, tokens_BN: jax.Array, *, decode_block: int):
    def step(c, tok_B):
        logits, c = _forward_cached(model, c, tok_B[:, None], False, decode_block)
        return c, logits[:, 0]

    cache, logits_NBV = jax.lax.scan(step, cache, tokens_BN.T)
    return logits_NBV.transpose(1, 0, 2), cache


def as_token_array(tokens) -> jax.Array:
    arr = np.asarray(tokens)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"tokens must be integer ids shaped (B, T), got shape {arr.shape} dtype {arr.dtype}")
    return jnp.asarray(arr, jnp.int32)


def decode_logits(model: DBAModel, tokens, prefill: int, policy: KVPolicy | None = None,
                  decode_block: int = 1024, max_len: int | None = None) -> jax.Array:
    """Teacher forcing: prefill `prefill` tokens through an empty cache, then feed the rest one
    at a time; logits (B, N, V) for every position."""
    idx = as_token_array(tokens)
    b, n = idx.shape
    max_len = n if max_len is None else max_len
    check_decode(n, prefill, decode_block, max_len)
    cache = kvc.init_cache(model.cfg, policy or KVPolicy(kind="fp32"), b, max_len)
    parts = []
    if prefill > 0:
        logits, cache = _prefill(model, cache, idx[:, :prefill], fresh=True, decode_block=decode_block)
        parts.append(logits)
    if prefill < n:
        logits, cache = _teacher_forced(model, cache, idx[:, prefill:], decode_block=decode_block)
        parts.append(logits)
    return jnp.concatenate(parts, axis=1)
