"""The fused Pallas decode kernel (jax_model/pallas_decode.py, run with interpret=True on the CPU)
against `cached_attend` on caches written through the real path (`kvcache.write`): every kind,
per-stream mixes, windows 0 / 1 / 128 below and above the window, lengths not dividing the block,
null attention on and off, the four attention modes' stream layouts, batch 1 and 3, T = 1..3,
rotated key streams; refusals; and `decode_logits` of a tiny model with the kernel switched in."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba.kvspec import KVPolicy, stream_spec
from jax_model import kvcache as kvc
from jax_model import pallas_decode as pd
from jax_model.cached_attention import cached_attend

pytestmark = [pytest.mark.kernels, pytest.mark.slow]  # the kernel in its interpreter: slow

# Jitted: one compile each instead of op-by-op dispatch (3-4x faster in the interpreter).
_STATIC = ("n_kv_head", "key_names", "decode_block")
reference = jax.jit(cached_attend, static_argnames=_STATIC)
fused = jax.jit(pd.fused_cached_attend, static_argnames=(*_STATIC, "interpret", "split_size"))

QUANT = ("q8_0", "q4_0", "nf4")

# mode: (key stream names, n_head, n_kv_head, widths)
MODES = {
    "standard": (("k",), 2, 2, {"k": 32, "v": 32}),
    "bottleneck": (("k",), 2, 2, {"k": 16, "v": 16}),
    "gqa": (("k",), 4, 2, {"k": 32, "v": 16}),
    # k_sem heads of 4 inside quant blocks of 8: two heads per scale column, two columns
    "decoupled": (("k_sem", "k_geo"), 4, 4, {"k_sem": 16, "k_geo": 32, "v": 32}),
}


def build_streams(kinds: dict[str, str], widths: dict[str, int], n_kv: int, qblock: int, residual: int,
                  batch: int, max_len: int, length: int, rotate=(), seed: int = 0) -> dict[str, kvc.StreamCache]:
    """Streams holding `length` random tokens, written by `kvcache.write` in two chunks."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, kind in kinds.items():
        rot = name in rotate
        spec = stream_spec(name, kind, widths[name], qblock, residual, max_len, rotated=rot)
        s = kvc.alloc_stream(spec, batch, max_len, widths[name] // n_kv if rot else 0)
        x = jnp.asarray(rng.standard_normal((batch, length, widths[name])), jnp.float32)
        cut = length // 2
        s = kvc.write(s, x[:, :cut], 0)
        out[name] = kvc.write(s, x[:, cut:], cut)
    return out


def run_both(mode, kinds, *, residual, batch, length, max_len, t=1, null=True, block=16, split=None,
             qblock=8, rotate=()):
    key_names, h, n_kv, widths = MODES[mode]
    streams = build_streams(kinds, widths, n_kv, qblock, residual, batch, max_len, length, rotate)
    rng = np.random.default_rng(1)
    dqk = sum(widths[k] // n_kv for k in key_names)
    dv = widths["v"] // n_kv
    q = jnp.asarray(rng.standard_normal((batch, h, t, dqk)), jnp.float32)
    null_kv = None
    if null:
        null_kv = (jnp.asarray(rng.standard_normal((h, dqk)), jnp.float32),
                   jnp.asarray(rng.standard_normal((h, dv)), jnp.float32))
    q_start, end = jnp.int32(length - t), jnp.int32(length)
    kw = {"n_kv_head": n_kv, "key_names": key_names, "decode_block": block}
    ref = reference(q, streams, q_start, end, null_kv, **kw)
    assert pd.supports(streams, key_names, n_kv, t, h)
    out = fused(q, streams, q_start, end, null_kv, interpret=True, split_size=split, **kw)
    assert out.shape == ref.shape == (batch, h, t, dv)
    return np.asarray(out), np.asarray(ref)


V29_MIX = {"k_sem": "q4_0", "k_geo": "q8_0", "v": "q4_0"}  # v29's decoupled default for a q4_0 cache
CASES = {
    # id: (mode, kinds, window, batch, length, max_len, other options)
    "standard-fp32-w0-b1": ("standard", {"k": "fp32", "v": "fp32"}, 0, 1, 40, 64, {"null": False}),
    "standard-fp16-w0-b3-null": ("standard", {"k": "fp16", "v": "fp16"}, 0, 3, 57, 64, {"split": 32}),
    "bottleneck-q8-w1-t2-null": ("bottleneck", {"k": "q8_0", "v": "q8_0"}, 1, 1, 100, 128, {"t": 2, "qblock": 32}),
    "bottleneck-q4-w128-below": ("bottleneck", {"k": "q4_0", "v": "q4_0"}, 128, 1, 90, 200,
                                 {"null": False, "block": 32}),
    "gqa-q4-w128-above-b3-null": ("gqa", {"k": "q4_0", "v": "q4_0"}, 128, 3, 250, 300, {"block": 32, "split": 64}),
    "gqa-nf4-w0-t3": ("gqa", {"k": "nf4", "v": "nf4"}, 0, 1, 77, 96, {"t": 3, "null": False}),
    "decoupled-v29mix-w1-b3-null": ("decoupled", V29_MIX, 1, 3, 45, 64, {}),
    "decoupled-nf4-fp16-q8-w128-null": ("decoupled", {"k_sem": "nf4", "k_geo": "fp16", "v": "q8_0"}, 128, 1, 150, 200,
                                        {"block": 32}),
    "decoupled-rot-w1-null": ("decoupled", V29_MIX, 1, 1, 60, 64, {"rotate": ("k_sem", "k_geo")}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_cached_attend(case, monkeypatch):
    if case.startswith("decoupled-nf4"):  # this one through the dot path (G*T >= DOT_MIN_ROWS on a GPU)
        monkeypatch.setattr(pd, "DOT_MIN_ROWS", 0)
    mode, kinds, window, batch, length, max_len, opts = CASES[case]
    out, ref = run_both(mode, kinds, residual=window, batch=batch, length=length, max_len=max_len, **opts)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_refusals_name_the_reason_and_the_model_path_falls_back():
    key_names, h, n_kv = ("k",), 2, 2
    # q8_0 blocks of 8 channels straddle heads of 12: refused, with the reason.
    streams = build_streams({"k": "q8_0", "v": "fp16"}, {"k": 24, "v": 16}, n_kv, 8, 0, 1, 32, 20)
    reason = pd.unsupported_reason(streams, key_names, n_kv)
    assert reason and "straddle" in reason
    q = jnp.ones((1, h, 1, 12), jnp.float32)
    args = (q, streams, jnp.int32(19), jnp.int32(20), None)
    kw = {"n_kv_head": n_kv, "key_names": key_names, "decode_block": 8}
    with pytest.raises(ValueError, match="straddle"):
        pd.fused_cached_attend(*args, interpret=True, **kw)
    with pytest.warns(UserWarning, match="falling back"):
        y = pd.decode_attend("pallas-interpret", *args, **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(cached_attend(*args, **kw)))
    # Compiled (Triton) tiles must be powers of two; other kinds and long prompt chunks are refused.
    ok = build_streams({"k": "q4_0", "v": "q8_0"}, {"k": 32, "v": 32}, n_kv, 8, 4, 1, 32, 20)
    assert pd.supports(ok, key_names, n_kv, 3, h, interpret=True)
    assert "power of two" in pd.unsupported_reason(ok, key_names, n_kv, 3, h, interpret=False)
    assert pd.supports(ok, key_names, n_kv, 2, h, interpret=False)
    assert "queries per row" in pd.unsupported_reason(ok, key_names, n_kv, pd.MAX_QUERIES + 1)
    assert pd.pallas_available(True)


def test_decode_logits_with_the_kernel_switched_in(monkeypatch):
    import jax_model
    from bench.parity_cases import (
        build_jax,
        init_like_state,
        make_config,
        random_tokens,
    )

    cfg = make_config("decoupled", ("null",), n_head=4, sem_dim=16, geo_dim=32, attn_dim=32)
    model = build_jax(cfg, init_like_state(cfg))
    tokens = random_tokens(cfg, 2, 12)
    policy = KVPolicy(kind="q4_0", qblock=8, residual=4)  # k_sem q4_0, k_geo q8_0, v q4_0
    base = np.asarray(jax_model.decode_logits(model, tokens, prefill=5, policy=policy, decode_block=4))
    calls = []
    real = pd.fused_cached_attend
    monkeypatch.setattr(pd, "fused_cached_attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        fused = np.asarray(jax_model.decode_logits(model, tokens, prefill=5, policy=policy, decode_block=4,
                                                   kv_fused="pallas-interpret"))
    assert calls, "the kernel was not used"
    np.testing.assert_allclose(fused, base, rtol=0, atol=1e-5)
    # The mode reaches the jitted decode as a static function: the same one per mode, so a second
    # call compiles nothing (the kernel is not traced again).
    traced = len(calls)
    again = np.asarray(jax_model.decode_logits(model, tokens, prefill=5, policy=policy, decode_block=4,
                                               kv_fused="pallas-interpret"))
    assert len(calls) == traced and np.array_equal(again, fused)
    assert pd.cache_attention("none") is cached_attend
    with pytest.raises(ValueError, match="kv_fused"):
        pd.cache_attention("triton")
