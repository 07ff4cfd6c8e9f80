"""Code paths that run on accelerators, checked here on CPU against the CPU paths.

The fused-attention path (jax.nn.dot_product_attention, `DBA_ATTENTION`) computes the same
attention as the XLA path, values and gradients. On a GPU `auto` runs cuDNN's kernel; here, on
CPU, jax's own "xla" implementation stands in for it, which checks what we add around it: the
head-dim padding to a multiple of 8, the layout changes, grouped kv-heads and scale 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dba.errors import UserError
from jax_model import attention_kernels as ak
from jax_model import fast_matmul as fm
from tests.support import tiered
from jax_model.loss import cross_entropy
from bench.parity_cases import build_jax, make_config, random_state, random_tokens


def _qkv(h: int, n_kv: int, dqk: int, dv: int, t: int = 37, b: int = 2, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, h, t, dqk)), jax.random.normal(kk, (b, n_kv, t, dqk)),
            jax.random.normal(kv, (b, n_kv, t, dv)))


@pytest.mark.parametrize("h,n_kv,dqk,dv", [(3, 3, 12, 12), (6, 2, 5, 7), (4, 1, 24, 9)])
def test_fused_matches_xla_path_values_and_grads(monkeypatch, h, n_kv, dqk, dv):
    q, k, v = _qkv(h, n_kv, dqk, dv)
    w = jax.random.normal(jax.random.key(9), (2, h, 37, dv))  # a random cotangent

    def loss(q, k, v):
        return jnp.sum(ak.attend(q, k, v, None) * w)

    def run(impl):  # a fresh jit per implementation: DBA_ATTENTION is read when tracing
        monkeypatch.setenv("DBA_ATTENTION", impl)
        return jax.jit(lambda q, k, v: (ak.attend(q, k, v, None), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    ref_out, ref_g = run("ours")
    out, g = run("xla")
    assert out.shape == ref_out.shape == (2, h, 37, dv)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(g, ref_g):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_auto_uses_xla_path_on_cpu_and_rejects_unknown(monkeypatch):
    monkeypatch.setenv("DBA_ATTENTION", "auto")
    assert ak.fused_attention_impl(jnp.bfloat16) is None  # no GPU here
    monkeypatch.setenv("DBA_ATTENTION", "flash")
    with pytest.raises(UserError, match="DBA_ATTENTION='flash'"):
        ak.fused_attention_impl(jnp.float32)


@pytest.mark.parametrize("mode", tiered(["decoupled", "gqa"], 1))
def test_model_loss_and_grads_same_with_fused_attention(monkeypatch, mode):
    cfg = make_config(mode)
    model = build_jax(cfg, random_state(cfg, seed=3))
    x = jnp.asarray(random_tokens(cfg, 2, 29, seed=4))
    y = jnp.roll(x, -1, axis=1)

    def loss_fn(m):
        return cross_entropy(m.forward(x), y)

    results = {}
    for impl in ("ours", "xla"):
        monkeypatch.setenv("DBA_ATTENTION", impl)
        loss, grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)
        results[impl] = (float(loss), jax.tree.leaves(grads))
    assert results["ours"][0] == pytest.approx(results["xla"][0], rel=1e-6)
    for a, b in zip(results["ours"][1], results["xla"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("vocab", [101, 128])
def test_vocab_padded_output_projection_matches(monkeypatch, vocab):
    """On accelerators the tied output pads the vocab to a multiple of VOCAB_PAD for its matmuls
    and slices the logits back: same logits and gradients as the unpadded CPU path."""
    kx, kw, kd = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (3, 7, 13))
    w = jax.random.normal(kw, (vocab, 13))
    dy = jax.random.normal(kd, (3, 7, vocab))

    def run():
        f = lambda x, w: jnp.sum(fm.dense_t(x, w) * dy)  # noqa: E731
        return jax.jit(lambda x, w: (fm.dense_t(x, w), jax.grad(f, argnums=(0, 1))(x, w)))(x, w)

    ref_y, ref_g = run()
    monkeypatch.setattr(fm, "_on_cpu", lambda: False)  # the accelerator path, run by XLA:CPU
    assert fm.vocab_pad(vocab) == -vocab % fm.VOCAB_PAD
    y, g = run()
    assert y.shape == (3, 7, vocab)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize("vocab", [101, 128])
@pytest.mark.parametrize("chunks", ["1", "3"])
def test_linear_cross_entropy_matches_unfused(monkeypatch, accelerator, vocab, chunks):
    """The fused output projection + loss (what training runs) against logits then
    cross_entropy: same loss and gradients, with and without the accelerator's vocab padding,
    in one token chunk or three (DBA_HEAD_CHUNKS)."""
    from jax_model.loss import head_chunks, linear_cross_entropy

    monkeypatch.setenv("DBA_HEAD_CHUNKS", chunks)
    assert head_chunks(21) == int(chunks)
    kx, kw, kt = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (21, 13))
    w = jax.random.normal(kw, (vocab, 13)) * 0.5
    t = jax.random.randint(kt, (21,), 0, vocab)

    def unfused(x, w):
        return cross_entropy(fm.dense_t(x, w), t)

    ref = jax.jit(jax.value_and_grad(unfused, argnums=(0, 1)))(x, w)
    if accelerator:
        monkeypatch.setattr(fm, "_on_cpu", lambda: False)
        assert fm.vocab_pad(vocab) > 0 or vocab % fm.VOCAB_PAD == 0
    got = jax.jit(jax.value_and_grad(lambda x, w: linear_cross_entropy(x, w, t), argnums=(0, 1)))(x, w)
    assert float(got[0]) == pytest.approx(float(ref[0]), rel=1e-6)
    for a, b in zip(got[1], ref[1]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_model_loss_is_cross_entropy_of_forward():
    cfg = make_config("decoupled")
    model = build_jax(cfg, random_state(cfg, seed=11))
    x = jnp.asarray(random_tokens(cfg, 2, 19, seed=12))
    y = jnp.roll(x, -1, axis=1)
    ref, ref_g = nnx.jit(lambda m: nnx.value_and_grad(lambda m: cross_entropy(m.forward(x), y))(m))(model)
    got, got_g = nnx.jit(lambda m: nnx.value_and_grad(lambda m: m.loss(x, y))(m))(model)
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_head_chunks_divide_the_tokens(monkeypatch):
    from jax_model.loss import head_chunks

    monkeypatch.setenv("DBA_HEAD_CHUNKS", "4")
    assert head_chunks(2048) == 4
    assert head_chunks(21) == 3  # the largest count <= 4 that divides 21
    assert head_chunks(23) == 1
    monkeypatch.setenv("DBA_HEAD_CHUNKS", "0")
    assert head_chunks(16) == 1
    monkeypatch.setenv("DBA_HEAD_CHUNKS", "two")
    with pytest.raises(UserError, match="DBA_HEAD_CHUNKS='two'"):
        head_chunks(16)
