"""KV cache: bytes allocated (JAX == torch == dba.kvspec.kv_bytes) and write/read round trips.

Expected reads are built position by position from the SPEC's rule: a position inside the
residual window of the current length reads back as fp16(x), an older one as
dequantize(quantize(x)) (whose bytes test_quant_parity checks against a numpy reference).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from dba import ModelConfig
from dba.kvspec import KV_KINDS, KVPolicy, kv_bytes
from jax_model import kvcache as jkv
from torch_ref import kvcache as tkv

MODES = ("standard", "bottleneck", "decoupled", "gqa")


def tiny(mode: str) -> ModelConfig:
    return ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=3, d_model=48, d_ff=80,
                       embed_dim=40, attn_mode=mode, attn_dim=42, sem_dim=18, geo_dim=24,
                       kv_head=1 if mode == "gqa" else None)


def hand_bytes(cfg: ModelConfig, policy: KVPolicy, length: int, batch: int) -> int:
    """SPEC §6 by hand, with the layout rule written out again (no dba.kvspec helpers)."""
    total = 0
    for name, dim in cfg.kv_streams().items():
        kind = getattr(policy, name) or policy.kind
        if name == "k_geo" and getattr(policy, name) is None and policy.kind == "q4_0":
            kind = "q8_0"
        if kind in ("fp16", "fp32"):
            total += batch * length * dim * (2 if kind == "fp16" else 4)
            continue
        qb = min((getattr(policy, f"qblock_{name}") or policy.qblock) or 32, dim)
        if kind != "q8_0":
            qb = max(2, qb - qb % 2)
        pad = -(-dim // qb) * qb
        payload = pad if kind == "q8_0" else pad // 2
        total += batch * length * (payload + pad // qb * 2) + batch * min(policy.residual, length) * dim * 2
    return total * cfg.n_layer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KV_KINDS)
def test_nbytes_match_accounting(mode, kind):
    cfg = tiny(mode)
    for residual, qblock in ((128, 32), (5, 7)):
        pol = KVPolicy(kind=kind, qblock=qblock, residual=residual)
        for length in (3, 37, 300):  # below both windows, between them, above both
            for batch in (1, 3):
                want = kv_bytes(cfg, length, batch, pol)["total_bytes"]
                assert want == hand_bytes(cfg, pol, length, batch), (residual, length, batch)
                jc = jkv.init_cache(cfg, pol, batch, length)
                tc = tkv.init_cache(cfg, pol, batch, length)
                assert jkv.nbytes(jc) == want, (residual, length, batch)
                assert tkv.nbytes(tc) == want, (residual, length, batch)


def test_nbytes_heterogeneous_policy():
    cfg = tiny("decoupled")
    pol = KVPolicy(kind="q4_0", qblock=16, residual=9, k_sem="nf4", qblock_k_sem=5, v="fp32", qblock_k_geo=7)
    want = kv_bytes(cfg, 50, 2, pol)["total_bytes"]
    assert want == hand_bytes(cfg, pol, 50, 2)
    jc, tc = jkv.init_cache(cfg, pol, 2, 50), tkv.init_cache(cfg, pol, 2, 50)
    assert jkv.nbytes(jc) == tkv.nbytes(tc) == want
    layer = jc.layers[0]
    assert (layer["k_sem"].kind, layer["k_geo"].kind, layer["v"].kind) == ("nf4", "q8_0", "fp32")
    assert layer["k_geo"].data.dtype == jnp.int8 and layer["k_sem"].data.dtype == jnp.uint8
    assert layer["v"].scale is None and layer["v"].ring is None
    assert tc.layers[1]["k_sem"].ring.shape == (2, 9, 18) and tc.layers[1]["k_sem"].ring.dtype == torch.float16
    assert len(jc.layers) == len(tc.layers) == cfg.n_layer


def test_jax_cache_is_a_pytree():
    cfg = tiny("decoupled")
    cache = jkv.init_cache(cfg, KVPolicy(kind="q4_0", residual=4), 1, 16)
    assert cache.pos.dtype == jnp.int32 and cache.pos.shape == ()
    # 2 layers x (k_sem: data, scale, ring; k_geo: same; v: same) + pos
    assert len(jax.tree_util.tree_leaves(cache)) == 2 * 9 + 1

    @jax.jit
    def fill(c):
        def body(c):
            x = jnp.full((1, 1, 24), c.pos.astype(jnp.float32) + 1.0)
            layer0 = dict(c.layers[0], k_geo=jkv.write(c.layers[0]["k_geo"], x, c.pos))
            return c.replace(layers=(layer0, *c.layers[1:]), pos=c.pos + 1)
        return lax.while_loop(lambda c: c.pos < 10, body, c)

    out = fill(cache)
    assert int(out.pos) == 10
    got = np.asarray(jkv.read(out.layers[0]["k_geo"], 0, 10, out.pos))
    # token p is the constant vector p+1: q8_0 (k_geo's hetero default) codes it as 127 times
    # the fp16 scale (p+1)/127; the 4 newest positions come from the fp16 ring, exact.
    v = np.arange(1, 11, dtype=np.float32)
    want = np.float32(127) * (v / np.float32(127)).astype(np.float16).astype(np.float32)
    want[6:] = v[6:]
    np.testing.assert_array_equal(got[0, :, 0], want)
    assert not np.array_equal(want[:6], v[:6])


# ---- write / read round trip -----------------------------------------------------------

@partial(jax.jit, static_argnums=())
def _jwrite(stream, x, start):
    return jkv.write(stream, x, start)


@partial(jax.jit, static_argnums=(2,))
def _jread(stream, start, size, length):
    return jkv.read(stream, start, size, length)


def expected_cache(x, kind, qblock):
    """What each position reads back once outside the window (reads are per token, so one
    quantize/dequantize of the whole sequence gives every position's value)."""
    if kind == "fp32":
        return x
    if kind == "fp16":
        return x.astype(np.float16).astype(np.float32)
    q, s = jkv.quantize(jnp.asarray(x), kind, qblock)
    return np.asarray(jkv.dequantize(q, s, kind, x.shape[-1], qblock))


def expected_read(old, x, ring, length, start, size):
    """Positions start..start+size-1 of a cache holding x[:, :length] (SPEC §5)."""
    out = old[:, start:start + size].copy()
    for i, p in enumerate(range(start, start + size)):
        if length - ring <= p < length:
            out[:, i] = x[:, p].astype(np.float16).astype(np.float32)
    return out


@pytest.mark.parametrize("kind,dim,qblock,residual", [
    ("fp32", 18, 32, 8), ("fp16", 42, 32, 8),
    ("q8_0", 24, 7, 8), ("q4_0", 37, 32, 8), ("nf4", 42, 5, 8),
    ("q8_0", 18, 0, 0),      # no ring
    ("q4_0", 24, 6, 100),    # window longer than the cache: everything reads exact
])
def test_write_read_round_trip(kind, dim, qblock, residual):
    B, max_len = 3, 48
    chunks = (13, 1, 20, 6)  # a chunk longer than the ring, a single token, ...
    rng = np.random.default_rng(dim * 100 + qblock)
    x = (rng.standard_normal((B, sum(chunks), dim)) * rng.uniform(0.01, 50, (B, sum(chunks), 1))).astype(np.float32)
    js = jkv.init_stream(kind, dim, qblock, residual, B, max_len)
    ts = tkv.init_stream(kind, dim, qblock, residual, B, max_len)
    ring = min(residual, max_len) if kind not in ("fp16", "fp32") else 0
    assert js.residual == ts.residual == ring
    old = expected_cache(x, kind, js.qblock)
    length = 0
    for T in chunks:
        xc = x[:, length:length + T]
        js = _jwrite(js, jnp.asarray(xc), jnp.int32(length))
        out = tkv.write(ts, torch.from_numpy(xc.copy()), length)
        assert out is ts  # torch writes in place
        length += T
        # few distinct sizes (each is one compile of the jitted read); starts are traced
        for start, size in ((0, 1), (length - 1, 1), (0, 5), (3, 5), (length - 5, 5), (0, 13), (length - 13, 13)):
            if start < 0 or start + size > length:
                continue
            want = expected_read(old, x, ring, length, start, size)
            got_j = np.asarray(_jread(js, jnp.int32(start), size, jnp.int32(length)))
            got_t = tkv.read(ts, start, size, length).numpy()
            assert got_j.shape == (B, size, dim) and got_j.dtype == np.float32
            np.testing.assert_array_equal(got_j, want, err_msg=f"jax {kind} len={length} [{start}:+{size}]")
            np.testing.assert_array_equal(got_t, want, err_msg=f"torch {kind} len={length} [{start}:+{size}]")
    # the stored tensors are identical bytes in both frameworks
    for a, b in ((js.data, ts.data), (js.scale, ts.scale), (js.ring, ts.ring)):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), b.numpy().view(np.uint8))


def test_quantized_store_keeps_window_tokens_quantized():
    # Positions inside the window are also in the quantized store; once the window moves past
    # them they read back dequantized (not fp16).
    B, dim, R = 1, 24, 4
    x = np.random.default_rng(3).standard_normal((B, 10, dim)).astype(np.float32)
    js = jkv.init_stream("q4_0", dim, 8, R, B, 10)
    ts = tkv.init_stream("q4_0", dim, 8, R, B, 10)
    js = jkv.write(js, jnp.asarray(x[:, :6]), 0)
    tkv.write(ts, torch.from_numpy(x[:, :6].copy()), 0)
    exact = x[:, 5].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jkv.read(js, 5, 1, 6))[:, 0], exact)
    js = jkv.write(js, jnp.asarray(x[:, 6:10]), 6)
    tkv.write(ts, torch.from_numpy(x[:, 6:10].copy()), 6)
    q, s = jkv.quantize(x[:, 5], "q4_0", 8)
    deq = np.asarray(jkv.dequantize(q, s, "q4_0", dim, 8))
    np.testing.assert_array_equal(np.asarray(jkv.read(js, 5, 1, 10))[:, 0], deq)
    np.testing.assert_array_equal(tkv.read(ts, 5, 1, 10).numpy()[:, 0], deq)
    assert not np.array_equal(deq, exact)


def test_torch_bounds_checked():
    ts = tkv.init_stream("q8_0", 8, 4, 2, 1, 5)
    with pytest.raises(ValueError):
        tkv.write(ts, torch.zeros(1, 3, 8), 3)
    with pytest.raises(ValueError):
        tkv.read(ts, 4, 2, 5)
