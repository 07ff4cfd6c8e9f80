"""The training loss: mean next-token cross-entropy in fp32 (`cross_entropy`), and the same loss
fused with the tied output projection (`linear_cross_entropy`, what `DBAModel.loss` uses).
Mirrors torch_ref/loss.py (which is the plain fp32 cross-entropy).

Why the custom backwards: autodiff's gradient of the loss makes three passes over the (B, T, V)
logits where (softmax - onehot) / N needs one, and keeps an fp32 (B, T, V) gradient that the
output projection's matmuls then read. Measured: on an H100 (seed config) the unfused head spent
~11 ms/step in elementwise passes over the fp32 logits; on XLA:CPU (config A, 2 cores) one
(N, V) matmul left a core idle for ~125 ms of a 511 ms step, which the head's independent token
chunks (`head_chunks`) run on both. The value is `cross_entropy(model.forward(x), y)` (tested).
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp

from jax_model.fast_matmul import dot_rows, env_int, pad_vocab, padded_logits, tn_matmul


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in fp32."""
    return _cross_entropy(logits_BTV.astype(jnp.float32), targets_BT.astype(jnp.int32))


def _ce_parts(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked), logz


# The gradient (softmax - onehot) / N written as one elementwise pass over the (B, T, V) logits:
# autodiff's version makes three (exp, scale, scatter of the picked entries), which on CPU cost
# more than the loss itself.
@jax.custom_vjp
def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return _ce_parts(logits, targets)[0]


def _ce_fwd(logits, targets):
    loss, logz = _ce_parts(logits, targets)
    return loss, (logits, logz, targets)


def _ce_bwd(res, g):
    logits, logz, targets = res
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    d = (jnp.exp(logits - logz[..., None]) - onehot) * (g / logz.size)
    return d, None


_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def linear_cross_entropy(x_NE: jax.Array, w_VE: jax.Array, targets_N: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits x @ w^T (fp32 accumulation) against targets, fused.

    One pass over the fp32 (N, V) logits makes logsumexp and the picked logit; the backward turns
    them into (softmax - onehot) / N already in the operands' dtype (bf16 GEMMs under mixed
    precision) for the two matmuls. Apart from the fp32 logits the forward keeps, no (N, V) array
    exists in fp32: on an H100 (seed config) the unfused head spent ~11 ms/step in elementwise
    passes over them. On accelerators the vocab is zero-padded (`fast_matmul.vocab_pad`) and the pad
    columns are masked out of the softmax. On a CPU the tokens go in `head_chunks()` independent
    chunks, so XLA:CPU runs the head's big matmuls on all cores at once.
    """
    return _linear_ce(x_NE, w_VE, targets_N.astype(jnp.int32), head_chunks(x_NE.shape[0]))


def head_chunks(n_tokens: int) -> int:
    """Token chunks of the fused head: XLA:CPU runs independent ops concurrently, each dot on one
    core, so one (N, V) matmul leaves the other cores idle (~125 of the 511 ms config A step on
    2 cores). DBA_HEAD_CHUNKS overrides; accelerators use 1 (one large GEMM fills the device)."""
    n = env_int("DBA_HEAD_CHUNKS")
    if n is None:
        n = min(os.cpu_count() or 1, 8) if jax.default_backend() == "cpu" else 1
    while n > 1 and n_tokens % n:
        n -= 1
    return max(n, 1)


def _chunks(a: jax.Array, n: int) -> list[jax.Array]:
    size = a.shape[0] // n
    return [a[i * size:(i + 1) * size] for i in range(n)]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear_ce(x_NE, w_VE, targets_N, n_chunks):
    return _linear_ce_fwd(x_NE, w_VE, targets_N, n_chunks)[0]


def _linear_ce_fwd(x_NE, w_VE, targets_N, n_chunks):
    n_vocab = w_VE.shape[0]
    residuals, total = [], 0.0
    for x_c, t_c in zip(_chunks(x_NE, n_chunks), _chunks(targets_N, n_chunks)):
        logits = padded_logits(x_c, w_VE)
        n_cols = logits.shape[1]
        real = logits if n_cols == n_vocab else jnp.where(jnp.arange(n_cols) < n_vocab, logits, -jnp.inf)
        logz = jax.nn.logsumexp(real, axis=-1)
        picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        total = total + jnp.sum(logz - picked)
        residuals.append((logits, logz))
    return total / targets_N.size, (x_NE, w_VE, targets_N, residuals)


def _linear_ce_bwd(n_chunks, res, g):
    x_NE, w_VE, targets_N, residuals = res
    n_vocab, w = w_VE.shape[0], pad_vocab(w_VE)
    cols = jnp.arange(w.shape[0])
    dxs, dw = [], 0.0
    for x_c, t_c, (logits, logz) in zip(_chunks(x_NE, n_chunks), _chunks(targets_N, n_chunks), residuals):
        d = jnp.exp(logits - logz[:, None]) - (cols == t_c[:, None])
        if w.shape[0] != n_vocab:
            d = jnp.where(cols < n_vocab, d, 0.0)
        d = (d * (g / targets_N.size)).astype(x_NE.dtype)
        dxs.append(dot_rows(d, w))
        # tn_matmul transposes x and the (V, E) product, never the (n, V) gradient.
        dw = dw + tn_matmul(d, x_c)
    dx = dxs[0] if n_chunks == 1 else jnp.concatenate(dxs, axis=0)
    return dx, dw[:n_vocab].astype(w_VE.dtype), None


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)
