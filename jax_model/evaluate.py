"""What a cache policy costs, measured through the real decode path (SPEC §5): teacher-forced
scores of a policy's cache against an fp32 cache on the same tokens. Mirrors torch_ref/evaluate.py.

Both caches take the same prompt (fresh attention, v29's order), then the same tokens one at a
time, exactly as generation feeds them: each token's K/V is appended (quantized, the newest
`residual` exact) and it attends over what the cache returns. Per scored position the scan keeps
only a few numbers (NLL under both caches, the KL between their next-token distributions, top-1
agreement and correctness), so memory does not grow with the vocabulary times the length.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba.errors import UserError
from dba.kvspec import KVPolicy
from jax_model import kvcache as kvc
from jax_model.pallas_decode import cache_attention

if TYPE_CHECKING:
    from jax_model.model import DBAModel

REFERENCE = KVPolicy(kind="fp32")
SCORES = ("nll", "ref_nll", "kl", "agree", "correct", "ref_correct")


def _position_scores(logits_ref_BV: jax.Array, logits_BV: jax.Array, target_B: jax.Array) -> tuple[jax.Array, ...]:
    lr = jax.nn.log_softmax(logits_ref_BV.astype(jnp.float32), axis=-1)
    lp = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    pick = lambda lx: -jnp.take_along_axis(lx, target_B[:, None], axis=-1)[:, 0]  # noqa: E731
    kl = jnp.sum(jnp.exp(lr) * (lr - lp), axis=-1)  # KL(fp32 || policy)
    top_ref, top = jnp.argmax(lr, axis=-1), jnp.argmax(lp, axis=-1)
    return pick(lp), pick(lr), kl, top == top_ref, top == target_B, top_ref == target_B


@partial(nnx.jit, graph=False, static_argnames=("n_prompt", "decode_block", "cache_attend"))
def _scores(model: DBAModel, ref_cache: kvc.Cache, cache: kvc.Cache, tokens_BL: jax.Array, *, n_prompt: int,
            decode_block: int, cache_attend) -> tuple[jax.Array, ...]:
    x_BT, y_BT = tokens_BL[:, :-1], tokens_BL[:, 1:]
    kw = {"decode_block": decode_block, "cache_attend": cache_attend}
    if n_prompt:
        prompt = x_BT[:, :n_prompt]
        _, ref_cache = model.forward_cached(prompt, ref_cache, fresh=True, last_only=True, **kw)
        _, cache = model.forward_cached(prompt, cache, fresh=True, last_only=True, **kw)

    def step(carry, xy):
        rc, c = carry
        x_B, y_B = xy
        logits_ref, rc = model.forward_cached(x_B[:, None], rc, fresh=False, **kw)
        logits, c = model.forward_cached(x_B[:, None], c, fresh=False, **kw)
        return (rc, c), _position_scores(logits_ref[:, 0], logits[:, 0], y_B)

    _, outs = jax.lax.scan(step, (ref_cache, cache), (x_BT[:, n_prompt:].T, y_BT[:, n_prompt:].T))
    return tuple(o.T for o in outs)


def score_policy(model: DBAModel, tokens_BL, n_prompt: int, policy: KVPolicy, *,
                 decode_block: int = 1024, kv_fused: str = "none") -> dict[str, np.ndarray]:
    """Scores of `policy`'s cache against an fp32 cache, teacher-forced on tokens (B, L).

    Inputs are tokens[:, :-1] and targets tokens[:, 1:]. The first `n_prompt` inputs go through
    both caches as one prompt; every later input is decoded one at a time, and its prediction of
    the next token is scored. Returns numpy (B, L - 1 - n_prompt) arrays: `nll` and `ref_nll`
    (the target's NLL under the policy's and the fp32 cache), `kl` (KL(fp32 || policy) of the
    next-token distributions), `agree` (same top-1 as fp32), `correct` / `ref_correct` (top-1
    equals the target). `kv_fused`: the attention over both caches, as in `decode.prefill`."""
    idx = model.as_tokens(tokens_BL)
    b, length = idx.shape
    if not 0 <= n_prompt < length - 1:
        raise UserError(f"the prompt ({n_prompt} tokens) must leave at least one of {length - 1} inputs to score")
    policy.check_for(model.cfg)
    ref_cache = kvc.init_cache(model.cfg, REFERENCE, b, length - 1)
    cache = kvc.init_cache(model.cfg, policy, b, length - 1)
    outs = _scores(model, ref_cache, cache, idx, n_prompt=int(n_prompt), decode_block=int(decode_block),
                   cache_attend=cache_attention(kv_fused))
    return dict(zip(SCORES, (np.asarray(o) for o in jax.device_get(outs))))


@partial(nnx.jit, graph=False, static_argnames=("decode_block", "cache_attend"))
def _decode_steps(model: DBAModel, cache: kvc.Cache, tokens_BN: jax.Array, *, decode_block: int,
                  cache_attend) -> jax.Array:
    def step(c, tok_B):
        logits, c = model.forward_cached(tok_B[:, None], c, fresh=False, decode_block=decode_block,
                                         cache_attend=cache_attend)
        return c, logits[:, 0, 0]

    return jax.lax.scan(step, cache, tokens_BN.T)[1]


def decode_step_seconds(model: DBAModel, policy: KVPolicy, ctx: int, n_steps: int, decode_block: int,
                        repeats: int = 3, kv_fused: str = "none") -> float:
    """Seconds per decode step (batch 1) with the cache filled to `ctx - n_steps` tokens, the best
    of `repeats` timed runs after a compiling one, with the attention over the cache `kv_fused`
    names. The cache holds zeros: a step's work does not depend on the values it reads, only on
    how many there are."""
    import time

    n = max(1, min(int(n_steps), int(ctx) - 1))
    tokens = jnp.zeros((1, n), jnp.int32)
    best, attend = float("inf"), cache_attention(kv_fused)
    for i in range(repeats + 1):
        cache = kvc.init_cache(model.cfg, policy, 1, int(ctx))
        cache = cache.replace(pos=jnp.asarray(int(ctx) - n, jnp.int32))
        t0 = time.perf_counter()
        jax.block_until_ready(_decode_steps(model, cache, tokens, decode_block=int(decode_block), cache_attend=attend))
        if i:
            best = min(best, (time.perf_counter() - t0) / n)
    return best


@nnx.jit
def _full_scores(model: DBAModel, ref: DBAModel, tokens_BL: jax.Array) -> tuple[jax.Array, ...]:
    x, y = tokens_BL[:, :-1], tokens_BL[:, 1:]
    lp, lr = model.forward(x), ref.forward(x)
    b, t, _ = lp.shape
    outs = _position_scores(lr.reshape(b * t, -1), lp.reshape(b * t, -1), y.reshape(-1))
    return tuple(o.reshape(b, t) for o in outs)


def score_against(model: DBAModel, ref: DBAModel, tokens_NL, batch: int = 1, on_batch=None) -> dict[str, np.ndarray]:
    """`model` against another model `ref` (a teacher) on the same sequences (N, L), full causal
    forwards without a cache: the SCORES of `score_policy` with `ref`'s next-token distribution in
    the fp32 cache's place (`ref_nll` is the teacher's NLL, `kl` is KL(ref || model), `agree` the
    top-1 agreement). The vocabularies must match."""
    if model.cfg.vocab_size != ref.cfg.vocab_size:
        raise UserError(f"the models' vocabularies differ ({model.cfg.vocab_size} vs {ref.cfg.vocab_size} ids)")
    parts = []
    for i in range(0, len(tokens_NL), batch):
        chunk = model.as_tokens(tokens_NL[i:i + batch])
        parts.append([np.asarray(o) for o in jax.device_get(_full_scores(model, ref, chunk))])
        if on_batch is not None:
            on_batch(chunk.shape[0])
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(SCORES)}
