"""Cached inference: prefill, the decode step, and teacher-forced `decode_logits` (SPEC §5).

Order of operations (v29's): a prompt through an *empty* cache attends over its own fresh K/V
and then stores them; every later call first appends its K/V and then attends over what the
cache returns (dequantized, newest tokens exact from the fp16 window), streaming the cache in
`decode_block` blocks with an online softmax. Everything runs through the model's one cached
path, `DBAModel.forward_cached`. Both steps are jitted with the cache as a pytree and the length
as an array: one compile per (batch, max_len, policy, prompt length), never one per token. The
host-side wrappers here refuse a cache overflow before the jitted cores run (traced, the
position is unknown). `kv_fused` picks the attention over the cache ("none": `cached_attend`;
"pallas" / "pallas-interpret": the fused kernel, `pallas_decode.cache_attention`), which reaches
the jitted cores as a static argument (one compile per mode). Mirrors torch_ref/decode.py.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from dba.errors import UserError
from dba.generation import check_decode
from dba.kvspec import KVPolicy, check_room
from jax_model import kvcache as kvc
from jax_model.pallas_decode import cache_attention

if TYPE_CHECKING:
    from jax_model.model import DBAModel

# Tree-mode jit (graph=False): the model goes in as a pytree and, unlike graph mode, its weights
# are not copied back out of every call (22.5 MB per decode step on config A). The cache is
# donated, so it is updated in place: the caller's `cache` is consumed, use the returned one.
jit_donating_cache = partial(nnx.jit, graph=False, donate_argnames=("cache",))


def _fresh(cache: kvc.Cache, fresh: bool | None) -> bool:
    """`fresh` resolved against the cache: None means "the cache is empty"; fresh attention over
    a cache that already holds tokens would ignore them, so it is refused."""
    pos = int(cache.pos)
    if fresh is None:
        return pos == 0
    if fresh and pos > 0:
        raise UserError(f"fresh attention needs an empty cache; this one holds {pos} tokens")
    return fresh


@partial(jit_donating_cache, static_argnames=("fresh", "decode_block", "last_only", "cache_attend"))
def _prefill(model: DBAModel, cache: kvc.Cache, tokens_BT: jax.Array, *, fresh: bool, decode_block: int,
             last_only: bool, cache_attend) -> tuple[jax.Array, kvc.Cache]:
    return model.forward_cached(tokens_BT, cache, fresh=fresh, decode_block=decode_block, last_only=last_only,
                                cache_attend=cache_attend)


def prefill(model: DBAModel, cache: kvc.Cache, tokens_BT: jax.Array, *, fresh: bool | None = None,
            decode_block: int = 1024, last_only: bool = False, kv_fused: str = "none") -> tuple[jax.Array, kvc.Cache]:
    """Run a prompt (or a further chunk of one) through the cache: (logits (B, T, V), or (B, 1, V)
    for the last position only with `last_only`; the new cache). `fresh` defaults to v29's order:
    fresh attention when the cache is empty, else append-then-read. Consumes `cache` (donated)."""
    check_room(int(cache.pos), tokens_BT.shape[1], cache.max_len)
    return _prefill(model, cache, tokens_BT, fresh=_fresh(cache, fresh), decode_block=decode_block,
                    last_only=last_only, cache_attend=cache_attention(kv_fused))


@partial(jit_donating_cache, static_argnames=("decode_block", "cache_attend"))
def _decode_step(model: DBAModel, cache: kvc.Cache, token_B: jax.Array, *, decode_block: int,
                 cache_attend) -> tuple[jax.Array, kvc.Cache]:
    logits, cache = model.forward_cached(token_B[:, None], cache, fresh=False, decode_block=decode_block,
                                         cache_attend=cache_attend)
    return logits[:, 0], cache


def decode_step(model: DBAModel, cache: kvc.Cache, token_B: jax.Array, *,
                decode_block: int = 1024, kv_fused: str = "none") -> tuple[jax.Array, kvc.Cache]:
    """One new token per row: append its K/V, attend over the cache; (logits (B, V), the new
    cache). Consumes `cache` (donated). The position check reads `cache.pos` on the host, so a
    loop of these waits for each step: `sampling` runs its token loop compiled instead."""
    check_room(int(cache.pos), 1, cache.max_len)
    return _decode_step(model, cache, token_B, decode_block=decode_block, cache_attend=cache_attention(kv_fused))


@partial(jit_donating_cache, static_argnames=("decode_block", "cache_attend"))
def _teacher_forced(model: DBAModel, cache: kvc.Cache, tokens_BN: jax.Array, *, decode_block: int, cache_attend):
    def step(c, tok_B):
        logits, c = model.forward_cached(tok_B[:, None], c, fresh=False, decode_block=decode_block,
                                         cache_attend=cache_attend)
        return c, logits[:, 0]

    cache, logits_NBV = jax.lax.scan(step, cache, tokens_BN.T)
    return logits_NBV.transpose(1, 0, 2), cache


def decode_logits(model: DBAModel, tokens, prefill: int, policy: KVPolicy | None = None,
                  decode_block: int = 1024, max_len: int | None = None, kv_fused: str = "none") -> jax.Array:
    """Teacher forcing: prefill `prefill` tokens through an empty cache, then feed the rest one
    at a time; logits (B, N, V) for every position (exported as `jax_model.decode_logits`)."""
    idx = model.as_tokens(tokens)
    b, n = idx.shape
    max_len = n if max_len is None else max_len
    check_decode(n, prefill, decode_block, max_len)
    cache = kvc.init_cache(model.cfg, policy or KVPolicy(kind="fp32"), b, max_len)
    check_room(0, n, cache.max_len)  # the cache starts empty
    attend, parts = cache_attention(kv_fused), []
    if prefill > 0:
        logits, cache = _prefill(model, cache, idx[:, :prefill], fresh=True, decode_block=decode_block,
                                 last_only=False, cache_attend=attend)
        parts.append(logits)
    if prefill < n:
        logits, cache = _teacher_forced(model, cache, idx[:, prefill:], decode_block=decode_block,
                                        cache_attend=attend)
        parts.append(logits)
    return jnp.concatenate(parts, axis=1)


def kernel_disagreement(model: DBAModel, policy: KVPolicy, batch: int, max_len: int, decode_block: int,
                        kv_fused: str) -> str | None:
    """Why the fused kernel `kv_fused` cannot serve this shape, or None: one decode step after a
    short prompt, through a cache of `max_len`, with the kernel and with the cached attention
    (dba/kernel_check.py decides and remembers)."""
    import numpy as np

    from dba.kernel_check import disagreement

    n = min(max_len, 16)
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (batch, n))
    return disagreement(lambda mode: decode_logits(model, tokens, n - 1, policy, decode_block=decode_block,
                                                   max_len=max_len, kv_fused=mode)[:, -1],
                        kv_fused, lambda a: jax.device_get(a))
