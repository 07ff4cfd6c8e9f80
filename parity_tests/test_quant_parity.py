"""KV quantization: JAX bytes == torch bytes == a numpy reference written here from SPEC §5.

The reference (tests/support.py's `ref_quantize`) is deliberately plain (explicit padding,
np.rint, argmin over the 16 levels typed in from the SPEC) so it shares nothing with the code under
test but the SPEC.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_model import kvcache as jkv
from tests.support import NF4_LEVELS as LEVELS
from tests.support import QMAX, ref_layout, ref_quantize
from torch_ref import kvcache as tkv

KINDS = ("q8_0", "q4_0", "nf4")


def make_x(seed, rows, dim, mode, kind, qblock):
    rng = np.random.default_rng(seed)
    if mode == "ties":
        # Block maxima at exactly QMAX make the fp32 scale exactly 1, so the half-integers are
        # exact ties for round-half-to-even (and exact NF4 midpoints never occur, which is fine).
        qb, pad, nb = ref_layout(kind, dim, qblock)
        m = QMAX[kind]
        x = rng.integers(-2 * m, 2 * m + 1, size=(rows, dim)).astype(np.float32) / 2
        x[:, ::qb] = m
        return x
    mags = 10.0 ** rng.uniform(-7, 4, size=(rows, 1))
    x = (rng.standard_normal((rows, dim)) * mags).astype(np.float32)
    if mode == "zeros":
        x[:, : dim // 2] = 0.0          # leading all-zero blocks
        x[0] = 0.0                      # and an all-zero row
    elif mode == "sparse":
        x[rng.random((rows, dim)) < 0.7] = 0.0
    return x


def check_bytes(x, kind, qblock):
    rq, rs, _, _ = ref_quantize(x, kind, qblock)
    jq, js = jkv.quantize(jnp.asarray(x), kind, qblock)
    tq, ts = tkv.quantize(torch.from_numpy(x), kind, qblock)
    jq, js, tq, ts = np.asarray(jq), np.asarray(js), tq.numpy(), ts.numpy()
    assert jq.dtype == rq.dtype and tq.dtype == rq.dtype
    assert js.dtype == np.float16 and ts.dtype == np.float16
    np.testing.assert_array_equal(jq, rq)
    np.testing.assert_array_equal(tq, rq)
    np.testing.assert_array_equal(js.view(np.uint16), rs.view(np.uint16))
    np.testing.assert_array_equal(ts.view(np.uint16), rs.view(np.uint16))
    return jq, js


@pytest.mark.slow
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), dim=st.integers(1, 300),
       qblock=st.one_of(st.just(0), st.integers(1, 64)), rows=st.integers(1, 3),
       mode=st.sampled_from(["normal", "zeros", "sparse", "ties"]), seed=st.integers(0, 2**31 - 1))
def test_quantize_bytes_and_roundtrip(kind, dim, qblock, rows, mode, seed):
    x = make_x(seed, rows, dim, mode, kind, qblock)
    jq, js = check_bytes(x, kind, qblock)

    # Round trip: the code is the nearest one to x / scale32 (half a step), then the product with
    # the fp16-stored scale moves each value by |code| * |s16 - s32| (tiny unless fp16 underflows).
    _, rs, s32, codes = ref_quantize(x, kind, qblock)
    qb, pad, nb = ref_layout(kind, dim, qblock)
    dj = np.asarray(jkv.dequantize(jnp.asarray(jq), jnp.asarray(js), kind, dim, qblock))
    dt = tkv.dequantize(torch.from_numpy(jq.copy()), torch.from_numpy(js.copy()), kind, dim, qblock).numpy()
    assert dj.shape == (rows, dim) and dj.dtype == np.float32
    np.testing.assert_array_equal(dj, dt)
    half = 0.5 if kind != "nf4" else float(np.max(np.diff(LEVELS))) / 2
    step = np.repeat(s32, qb, axis=-1)[:, :dim].astype(np.float64)
    s16 = np.repeat(rs.astype(np.float64), qb, axis=-1)[:, :dim]
    c = codes.reshape(rows, pad)[:, :dim].astype(np.float64)
    bound = half * step * (1 + 1e-5) + np.abs(c) * np.abs(s16 - step) + 1e-6 * np.abs(x) + 1e-30
    err = np.abs(dj.astype(np.float64) - x)
    assert np.all(err <= bound), float(np.max(err - bound))
    # and the dequantized value is exactly code * float32(fp16 scale)
    np.testing.assert_array_equal(dj, (c * s16).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_shapes_dtypes_and_jit(kind):
    x = np.random.default_rng(1).standard_normal((2, 3, 37)).astype(np.float32)
    qb, pad, nb = ref_layout(kind, 37, 32)
    q, s = jkv.quantize(x, kind, 32)
    width = pad if kind == "q8_0" else pad // 2
    assert q.shape == (2, 3, width) and s.shape == (2, 3, nb)
    assert q.dtype == (jnp.int8 if kind == "q8_0" else jnp.uint8) and s.dtype == jnp.float16
    qj, sj = jax.jit(lambda a: jkv.quantize(a, kind, 32))(x)  # traced: same bytes as eager
    np.testing.assert_array_equal(np.asarray(qj), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(sj).view(np.uint16), np.asarray(s).view(np.uint16))
    rq, rs, _, _ = ref_quantize(x.reshape(6, 37), kind, 32)
    np.testing.assert_array_equal(np.asarray(q).reshape(6, -1), rq)
    # bf16 / fp16 inputs are quantized from their exact fp32 value
    xh = x.astype(np.float16)
    rq16, _, _, _ = ref_quantize(xh.astype(np.float32).reshape(6, 37), kind, 32)
    np.testing.assert_array_equal(np.asarray(jkv.quantize(jnp.asarray(xh), kind, 32)[0]).reshape(6, -1), rq16)
    np.testing.assert_array_equal(tkv.quantize(torch.from_numpy(xh), kind, 32)[0].numpy().reshape(6, -1), rq16)


def test_packing_nibble_order():
    # q4_0 with scale exactly 1 (block max 7): codes 7, -7, 0, 3 -> u 15, 1, 8, 11;
    # byte 0 = 15*16 + 1 = 241 (even channel high), byte 1 = 8*16 + 11 = 139.
    x = np.array([[7.0, -7.0, 0.0, 3.0]], np.float32)
    for q, s in (jkv.quantize(x, "q4_0", 4), tkv.quantize(torch.from_numpy(x), "q4_0", 4)):
        assert np.asarray(q).tolist() == [[241, 139]]
        assert float(np.asarray(s)[0, 0]) == 1.0


def test_nf4_ties_take_first_level():
    # With scale 1, y = midpoint of levels 7 (0.0) and 8 (0.0795...) computed in fp32: if the two
    # fp32 distances are equal, argmin (and we) pick 7; the reference decides independently.
    mid = np.float32((LEVELS[7] + LEVELS[8]) / 2)
    x = np.array([[1.0, mid, -mid, 0.0]], np.float32)
    check_bytes(x, "nf4", 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected(bad):
    x = np.ones((2, 8), np.float32)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        jkv.quantize(jnp.asarray(x), "q8_0", 4)
    with pytest.raises(ValueError, match="non-finite"):
        tkv.quantize(torch.from_numpy(x), "q4_0", 4)


def test_plain_kinds_rejected_by_quantize():
    with pytest.raises(ValueError):
        jkv.quantize(jnp.ones((1, 4)), "fp16", 4)
    with pytest.raises(ValueError):
        tkv.quantize(torch.ones(1, 4), "fp32", 4)
