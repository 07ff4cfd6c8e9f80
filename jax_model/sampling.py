"""Batched generation over the KV cache; the token loop runs compiled (one `lax.scan`).

Greedy when `temperature == 0` or `top_k == 1`; otherwise temperature, then top-k, then
nucleus (top-p) filtering, sampled with a key derived from (seed, step). Mirrors
torch_ref/sampling.py (the same filtering; the random streams differ between frameworks).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from dba.generation import PlanFor, check_sampling, generation_cache_len, online_capacities
from dba.kvspec import KVPolicy
from jax_model import decode
from jax_model import kvcache as kvc
from jax_model.cached_attention import CacheAttend, cached_attend
from jax_model.pallas_decode import cache_attention
from jax_model.recache import recache

if TYPE_CHECKING:
    from jax_model.model import DBAModel


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """Temperature, top-k and top-p as -inf masks on fp32 logits."""
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep_sorted = before < top_p  # always keeps the top token
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_next(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                top_p: float | None) -> jax.Array:
    if temperature == 0.0 or top_k == 1:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p)).astype(jnp.int32)


@partial(decode.jit_donating_cache,
         static_argnames=("n_new", "temperature", "top_k", "top_p", "eos_id", "decode_block", "cache_attend"))
def _token_loop(model: DBAModel, cache: kvc.Cache, last_logits_BV: jax.Array, key: jax.Array, done_B: jax.Array,
                start: jax.Array, *, n_new: int, temperature: float, top_k, top_p, eos_id, decode_block: int,
                cache_attend: CacheAttend = cached_attend) -> tuple[jax.Array, kvc.Cache, jax.Array, jax.Array]:
    """n_new sampled tokens (B, n_new), the cache after them, the last logits and which rows are
    done (emitted eos_id); token i of the loop draws with key fold_in(key, start + i), so a
    generation cut into segments draws what one loop would. Consumes `cache` (donated).
    `cache_attend`: the attention over the cache (`pallas_decode.cache_attention`)."""

    def step(carry, i):
        cache, logits, done = carry
        tok = sample_next(logits, jax.random.fold_in(key, start + i), temperature, top_k, top_p)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
            done = done | (tok == eos_id)
        new_logits, cache = model.forward_cached(tok[:, None], cache, fresh=False, decode_block=decode_block,
                                                 cache_attend=cache_attend)
        return (cache, new_logits[:, 0], done), tok

    init = (cache, last_logits_BV, done_B)
    (cache, logits, done), toks_NB = jax.lax.scan(step, init, jnp.arange(n_new))
    # Returning the cache lets XLA alias it to the donated input: the loop then updates the
    # caller's buffers in place instead of a copy (a 32k q4_0 decode needs the cache once, not twice).
    return toks_NB.T, cache, logits, done


def generate(model: DBAModel, prompt, max_new_tokens: int = 64, policy: KVPolicy | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_id: int | None = None, decode_block: int = 1024,
             max_len: int | None = None, plan_for: PlanFor | None = None, interval: int = 256,
             kv_fused: str = "none") -> jax.Array:
    """Prompt (B, T) ids -> (B, T + max_new_tokens) ids; rows that emit `eos_id` pad with it.
    `kv_fused`: the attention over the cache, as in `decode.prefill`.

    With `plan_for` (the online self-optimizing cache policy) the cache grows through the
    capacities of `online_capacities`, and at each `plan_for(capacity)` gives the policy and decode
    block: the tokens cached so far are stored again under it (`recache`), and sampling goes on
    with the same random stream (`policy` and `max_len` are then unused)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    idx = model.as_tokens(prompt)
    b, t = idx.shape
    caps = [generation_cache_len(t, max_new_tokens, max_len)]
    if plan_for is not None:
        caps = online_capacities(t, max_new_tokens, int(interval))
        policy, decode_block = plan_for(caps[0])
    cache = kvc.init_cache(model.cfg, policy or KVPolicy(kind="fp16"), b, caps[0])
    logits, cache = decode.prefill(model, cache, idx, decode_block=decode_block, last_only=True, kv_fused=kv_fused)
    logits, key, done, out, made = logits[:, -1], jax.random.PRNGKey(seed), jnp.zeros((b,), bool), [idx], 0
    for i, cap in enumerate(caps):
        if i:
            policy, decode_block = plan_for(cap)
            cache = recache(model.cfg, cache, policy, max_len=cap)
        n = min(cap - t, max_new_tokens) - made
        if n > 0:
            new, cache, logits, done = _token_loop(model, cache, logits, key, done, jnp.int32(made), n_new=n,
                                                   temperature=float(temperature), top_k=top_k, top_p=top_p,
                                                   eos_id=eos_id, decode_block=decode_block,
                                                   cache_attend=cache_attention(kv_fused))
            out.append(new)
            made += n
    return jnp.concatenate(out, axis=1)
