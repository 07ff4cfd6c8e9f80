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
from jax_model.layers import (INFERENCE_CHUNKS, NEG_INF, attend, group_queries, merge_heads, null_scores, scores,
                              split_heads)
from jax_model.model import Attention, DBAModel


# Up to this many queries per row (decode: 1) the cached attention multiplies the blocks in
# their stored (B, n, width) layout by block-diagonal query matrices: plain 2-D matmuls, no
# per-block transpose into heads. It spends n_kv_head x the (tiny) FLOPs of a per-head dot, so
# long prompt chunks keep the per-head path. Decode on config A: 2.2x faster per cache block.
_NATURAL_MAX_T = 4


def _key_streams(cfg) -> tuple[str, ...]:
    """The cached key streams in the order their per-head slices are concatenated in q_cat."""
    return ("k_sem", "k_geo") if cfg.attn_mode == "decoupled" else ("k",)


def _natural_layout_ops(attn: Attention, q: jax.Array):
    """(scores(block) -> (B, K, G, T, n) fp32, pv(p, v_block) -> (B, K, G, T, Dv) fp32) computed
    on blocks in their stored layout: scores = sum over key streams of block (B, n, K*d) @
    Q (B, K*d, K*G*T), with Q holding query (k, g, t) in the rows of kv-head k and zeros elsewhere."""
    b, n_kv, g, t, _ = q.shape
    widths = attn.cfg.kv_streams()
    eye = jnp.eye(n_kv, dtype=q.dtype)
    qx, at = {}, 0
    for name in _key_streams(attn.cfg):
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


def cached_attend(attn: Attention, q_BHTD: jax.Array, streams: dict, q_start: jax.Array,
                  length: jax.Array, decode_block: int) -> jax.Array:
    """Attention of T queries (absolute positions q_start..) over the first `length` cached
    tokens, one block of `decode_block` keys at a time (online softmax, fp32 accumulators).

    The residual window (the newest R tokens, exact fp16) is one more block read straight from
    the ring, and the blocks cover only the older, quantized positions: gathering the ring into
    every block cost more than the dequantization itself.
    """
    b, h, t, _ = q_BHTD.shape
    n_kv = attn.cfg.n_kv_head
    g = h // n_kv
    max_len = next(iter(streams.values())).max_len
    blk = min(decode_block, max_len)
    q = group_queries(q_BHTD, n_kv)
    q_pos = q_start + jnp.arange(t)
    dv = attn.cfg.v_dim // h
    rings = {s.residual for s in streams.values() if s.residual > 0}
    if len(rings) > 1:
        raise ValueError(f"streams of one layer have different residual windows: {sorted(rings)}")
    r = rings.pop() if rings else 0
    store_end = length - r  # positions below come from the blocks, the rest from the window

    natural = t <= _NATURAL_MAX_T
    if natural:
        score_fn, pv_fn = _natural_layout_ops(attn, q)
    else:
        def score_fn(block):
            return scores(q, attn.kv_heads(block)[0])

        def pv_fn(p, v_BNW):
            return jnp.einsum("bkgtl,bkld->bkgtd", p, split_heads(v_BNW, n_kv).astype(jnp.float32))

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
        q, kv = attn.queries_and_kv(hx, positions)  # all projections in one matmul
        streams = {name: kvc.write(s, kv[name], start) for name, s in streams.items()}
        if fresh:
            k, v = attn.kv_heads(kv)
            y = attend(q, k, v, attn.null_kv(), n_chunks=INFERENCE_CHUNKS)
        else:
            y = cached_attend(attn, q, streams, start, length, decode_block)
        x = x + attn.out_proj(merge_heads(y)).astype(jnp.float32)
        x = x + block.ff(block.ln2(x)).astype(jnp.float32)
        new_layers.append(streams)
    if last_only:  # generation needs only the next-token logits, not the prompt's
        x = x[:, -1:]
    return model.unembed(x), cache.replace(layers=tuple(new_layers), pos=length)


# Tree-mode jit (graph=False): the model goes in as a pytree and, unlike graph mode, its weights
# are not copied back out of every call (22.5 MB per decode step on config A). The cache is
# donated, so it is updated in place: the caller's `cache` is consumed, use the returned one.
_jit = partial(nnx.jit, graph=False, donate_argnames=("cache",))


@partial(_jit, static_argnames=("fresh", "decode_block", "last_only"))
def prefill(model: DBAModel, cache: kvc.Cache, tokens_BT: jax.Array, *, fresh: bool = True,
            decode_block: int = 1024, last_only: bool = False) -> tuple[jax.Array, kvc.Cache]:
    """Run a prompt (or a further chunk of one) through the cache; logits (B, T, V), or
    (B, 1, V) for the last position only with `last_only`. Consumes `cache` (donated)."""
    return _forward_cached(model, cache, tokens_BT, fresh, decode_block, last_only)


_prefill = prefill  # decode_logits' `prefill` argument shadows the name


@partial(_jit, static_argnames=("decode_block",))
def decode_step(model: DBAModel, cache: kvc.Cache, token_B: jax.Array, *,
                decode_block: int = 1024) -> tuple[jax.Array, kvc.Cache]:
    """One new token per row: append its K/V, attend over the cache; logits (B, V)."""
    logits, cache = _forward_cached(model, cache, token_B[:, None], False, decode_block)
    return logits[:, 0], cache


@partial(_jit, static_argnames=("decode_block",))
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
