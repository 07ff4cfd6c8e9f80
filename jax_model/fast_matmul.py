"""The matmuls of every Linear and of the tied output projection (`dense`, `dense_t`) with
hand-written backwards, and the vocab padding of the output projection. The model reads them
as plain `x @ w` and `x @ w^T`: the values are the same, only the way XLA computes them changes.

Why it exists: autodiff's backward of a dot leaves XLA:CPU's fast matmul path (the comment
below says how), and on accelerators it would run the tied output's gradient in fp32 against an
unaligned vocab. What it was measured to buy (README, Performance): on 2 CPU cores the 2-D
operands and materialised transposes are one of the three changes that took config A's jitted
train step from 1,264 to 4,442 tokens/s (the tied output's weight gradient alone 68 -> 44 ms);
on an H100 (seed config, bf16) the bf16 output-projection gradient took the step from 312,925 to
370,685 tokens/s and the vocab padding on to 407,471.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from dba.errors import UserError

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
