"""Hadamard-rotated key streams (`k_sem=q4_0+rot`): the transform against a float64 Hadamard
matrix, identical bytes in JAX and torch, scores unchanged by the query-side rotation, decode
across frameworks, the power-of-two check, and unchanged accounting."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jax_model
import jax_model.decode as jd
import torch_ref
from bench.parity_cases import build_jax, build_torch, init_like_state, make_config, random_state, random_tokens
from dba.config import key_streams
from dba.errors import UserError
from dba.kvspec import KVPolicy, kv_bytes, parse_policy, stream_spec
from dba.rotation import rotation_dims
from jax_model import kvcache as jkv
from jax_model.layers import hadamard as j_hadamard
from tests.support import ref_quantize, tiered
from torch_ref import kvcache as tkv
from torch_ref.layers import hadamard as t_hadamard

KINDS = ("q8_0", "q4_0", "nf4")


def ref_hadamard(n: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of order n (a power of two), float64: [[H, H], [H, -H]]."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def rotate_ref(x: np.ndarray, n: int) -> np.ndarray:
    """float64 x @ H_n on every n-channel slice of the last dim."""
    x = np.asarray(x, np.float64)
    return (x.reshape(*x.shape[:-1], -1, n) @ ref_hadamard(n)).reshape(x.shape)


# Rotatable tiny configs (head dims powers of two): decoupled sem 4 / geo 8 over 6 heads; gqa 8
# (2 kv-heads); standard 8; bottleneck 4.
ROT_CONFIGS = {
    "decoupled-null": ("decoupled", ("null",), dict(sem_dim=24, geo_dim=48)),
    "decoupled-tie_qk": ("decoupled", ("tie_qk",), dict(sem_dim=24, geo_dim=48)),
    "gqa-null": ("gqa", ("null",), dict(attn_dim=48)),
    "standard-tie_qk": ("standard", ("tie_qk",), dict(d_model=48)),
    "bottleneck-null": ("bottleneck", ("null",), dict(attn_dim=24)),
}


def rot_config(name: str):
    mode, options, over = ROT_CONFIGS[name]
    return make_config(mode, options, **over)


# ---- the transform ------------------------------------------------------------------------

@pytest.mark.parametrize("n", tiered([1, 2, 8, 128], 3))
def test_hadamard_matches_the_reference_matrix(n):
    rng = np.random.default_rng(n)
    heads = 3
    x = (rng.standard_normal((2, 5, heads * n)) * 10.0 ** rng.uniform(-3, 3, (2, 5, 1))).astype(np.float32)
    want = rotate_ref(x, n)
    hj = np.asarray(j_hadamard(jnp.asarray(x), n))
    hjj = np.asarray(jax.jit(j_hadamard, static_argnums=1)(jnp.asarray(x), n))
    ht = t_hadamard(torch.from_numpy(x), n).numpy()
    assert hj.dtype == ht.dtype == np.float32
    # fp32 butterflies: each stage rounds once, |error| <= log2(n) eps sum|x| per head
    bound = max(1, int(np.log2(n))) * 2.0 ** -23 * np.abs(x).reshape(2, 5, heads, n).sum(-1, keepdims=True)
    assert np.all(np.abs(hj - want).reshape(2, 5, heads, n) <= bound * 1.0001)
    # the same bits in both frameworks, eager and compiled
    np.testing.assert_array_equal(hj.view(np.uint32), ht.view(np.uint32))
    np.testing.assert_array_equal(hjj.view(np.uint32), ht.view(np.uint32))
    # H H = n I: integers stay exact
    xi = rng.integers(-50, 51, (4, heads * n)).astype(np.float32)
    twice = np.asarray(j_hadamard(j_hadamard(jnp.asarray(xi), n), n))
    np.testing.assert_array_equal(twice, n * xi)
    np.testing.assert_array_equal(t_hadamard(t_hadamard(torch.from_numpy(xi), n), n).numpy(), n * xi)


# ---- the bytes of a rotated stream ----------------------------------------------------------

def _streams(kind, heads, n, qblock, residual, batch, max_len):
    spec = stream_spec("k_sem", kind, heads * n, qblock, residual, max_len, rotated=True)
    return (jkv.alloc_stream(spec, batch, max_len, rot_dim=n),
            tkv.alloc_stream(spec, batch, max_len, rot_dim=n))


def _arrays(stream):
    out = {}
    for key in ("data", "scale", "ring"):
        a = getattr(stream, key)
        if a is not None:
            a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            out[key] = a.view(np.uint16) if a.dtype == np.float16 else a
    return out


_jit_write = jax.jit(jkv.write)


# Shapes from small sets: every new shape compiles the write again (eager ops included), and the
# bytes depend on the values, which vary freely.
@pytest.mark.slow  # every new shape compiles the write again: ~1 s an example
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), heads=st.sampled_from([1, 3]), log_n=st.sampled_from([0, 2, 3, 6]),
       qblock=st.sampled_from([0, 3, 8, 40]), t=st.sampled_from([1, 5]), start=st.sampled_from([0, 3]),
       residual=st.sampled_from([0, 2, 5]), outliers=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rotated_stream_bytes_match_across_frameworks(kind, heads, log_n, qblock, t, start, residual, outliers, seed):
    n = 2 ** log_n
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, t, heads * n)) * 10.0 ** rng.uniform(-4, 3, (2, t, 1))).astype(np.float32)
    if outliers:  # a few large channels: what the rotation is for
        x[..., rng.integers(0, heads * n, 2)] *= 40.0
    # |H x| <= sum |x| over a head: keep that inside fp16 (the window) and the scale cap
    x *= np.float32(min(1.0, 3e4 / np.abs(x).reshape(2, t, heads, n).sum(-1).max()))
    js, ts = _streams(kind, heads, n, qblock, residual, 2, start + t + 1)
    je = jkv.write(js, jnp.asarray(x), start)
    jj = _jit_write(js, jnp.asarray(x), jnp.int32(start))
    tt = tkv.write(ts, torch.from_numpy(x), start)
    a_e, a_j, a_t = _arrays(je), _arrays(jj), _arrays(tt)
    for key in a_t:
        np.testing.assert_array_equal(a_e[key], a_t[key], err_msg=key)
        np.testing.assert_array_equal(a_j[key], a_t[key], err_msg=key)
    # what is stored is SPEC §5's quantization of the rotated keys (and their fp16 in the ring)
    hx = np.asarray(j_hadamard(jnp.asarray(x), n))
    rq, rs, _, _ = ref_quantize(hx.reshape(-1, heads * n), kind, qblock)
    np.testing.assert_array_equal(a_t["data"][:, start:start + t].reshape(2 * t, -1), rq)
    np.testing.assert_array_equal(a_t["scale"][:, start:start + t].reshape(2 * t, -1), rs.view(np.uint16))
    if residual:
        m = min(t, residual)
        slots = np.arange(start + t - m, start + t) % residual
        np.testing.assert_array_equal(a_t["ring"][:, slots], hx[:, t - m:].astype(np.float16).view(np.uint16))
    # and reads give back the rotated keys, which un-rotate to x up to each head's largest
    # storage error (H^T e / n averages the errors): half a code step of the largest value, plus
    # the fp16 rounding of scale or window (an fp16 subnormal scale is off by up to 3e-8)
    back = tkv.read(tt, start, t, start + t).numpy()
    err = np.abs(rotate_ref(back, n) / n - x).reshape(2, t, heads, n).max(-1)
    step = {"q8_0": 0.5 / 127, "q4_0": 0.5 / 7, "nf4": 0.14}[kind]
    amax = np.abs(hx).max(-1, keepdims=True)
    assert np.all(err <= (step + 2e-3) * amax + 127 * 3e-8)


def test_rotation_lowers_4bit_error_on_outlier_keys():
    """The point of +rot: keys with an outlier channel per head lose less to q4_0."""
    rng = np.random.default_rng(0)
    heads, n = 6, 8
    x = rng.standard_normal((1, 64, heads * n)).astype(np.float32)
    x[..., ::n] *= 20.0  # channel 0 of every head
    plain = tkv.alloc_stream(stream_spec("k", "q4_0", heads * n, 32, 0, 64), 1, 64)
    rot = tkv.alloc_stream(stream_spec("k", "q4_0", heads * n, 32, 0, 64, rotated=True), 1, 64, rot_dim=n)
    tkv.write(plain, torch.from_numpy(x), 0)
    tkv.write(rot, torch.from_numpy(x), 0)
    err_plain = np.abs(tkv.read(plain, 0, 64, 64).numpy() - x).mean()
    err_rot = np.abs(rotate_ref(tkv.read(rot, 0, 64, 64).numpy(), n) / n - x).mean()
    assert err_rot < 0.7 * err_plain, (err_rot, err_plain)


# ---- scores and decode ------------------------------------------------------------------------

def rotated_cache(kvc, cfg, policy, batch, max_len, **kw):
    """A cache under `policy` whose key streams are all rotated, whatever their kind (the policy
    syntax refuses +rot for fp16/fp32; this tests the query rotation with exact storage)."""
    cache = kvc.init_cache(cfg, policy, batch, max_len, **kw)
    dims = {name: cfg.kv_streams()[name] // cfg.n_kv_head for name in key_streams(cfg)}
    layers = []
    for layer in cache.layers:
        new = dict(layer)
        for name, n in dims.items():
            spec = dataclasses.replace(layer[name].spec, rotated=True)
            new[name] = kvc.alloc_stream(spec, batch, max_len, rot_dim=n, **kw)
        layers.append(new)
    return kvc.Cache(tuple(layers) if kvc is jkv else layers, cache.pos)


# The prompt goes in as a fresh chunk of 5, a cached chunk of 6 (the per-head path, T > 4) and a
# cached chunk of 3 (the natural-layout path), then one token at a time.
CHUNKS = (5, 6, 3)


def run_jax(model, cache, tokens, decode_block):
    out, at = [], 0
    for i, c in enumerate(CHUNKS):
        logits, cache = jd.prefill(model, cache, jnp.asarray(tokens[:, at:at + c]), fresh=i == 0,
                                   decode_block=decode_block)
        out.append(np.asarray(logits))
        at += c
    for i in range(at, tokens.shape[1]):
        logits, cache = jd.decode_step(model, cache, jnp.asarray(tokens[:, i]), decode_block=decode_block)
        out.append(np.asarray(logits)[:, None])
    return np.concatenate(out, axis=1), cache


def run_torch(model, cache, tokens, decode_block):
    import torch_ref.decode as td

    out, at = [], 0
    tokens = torch.as_tensor(tokens)
    for i, c in enumerate(CHUNKS):
        logits, cache = td.prefill(model, cache, tokens[:, at:at + c], fresh=i == 0, decode_block=decode_block)
        out.append(logits.numpy())
        at += c
    for i in range(at, tokens.shape[1]):
        logits, cache = td.decode_step(model, cache, tokens[:, i], decode_block=decode_block)
        out.append(logits.numpy()[:, None])
    return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("name", tiered(["decoupled-null", "gqa-null", "standard-tie_qk"], 0))  # 4-5 s each
def test_query_rotation_leaves_scores_unchanged(name):
    """fp32 storage, every key stream rotated vs none: the same logits (1e-5), and the full forward."""
    cfg = rot_config(name)
    state = random_state(cfg, 31)
    jm, tm = build_jax(cfg, state), build_torch(cfg, state)
    tokens = random_tokens(cfg, 2, 19, seed=3)
    full = np.asarray(jm(tokens))
    pol = KVPolicy(kind="fp32")
    for kvc, run, model in ((jkv, run_jax, jm), (tkv, run_torch, tm)):
        plain, _ = run(model, kvc.init_cache(cfg, pol, 2, 19), tokens, 4)
        rot, cache = run(model, rotated_cache(kvc, cfg, pol, 2, 19), tokens, 4)
        assert all(s.rot_dim for n, s in cache.layers[0].items() if n != "v")
        assert np.abs(rot - plain).max() <= 1e-5, (kvc.__name__, np.abs(rot - plain).max())
        assert np.abs(rot - full).max() <= 1e-5
        assert np.abs(full).max() > 0.3


ROT_POLICIES = {
    "decoupled-null": "k_sem=q4_0+rot,k_geo=q8_0+rot,v=q4_0,qblock=4,residual=3",
    "decoupled-tie_qk": "k_sem=nf4+rot,k_geo=q4_0+rot,v=q8_0,qblock=8,residual=4",
    "gqa-null": "k=q4_0+rot,v=q4_0,qblock=6,residual=4",
    "standard-tie_qk": "k=q8_0+rot,v=nf4,qblock=0,residual=2",
    "bottleneck-null": "k=nf4+rot,v=q4_0,qblock=4,residual=0",
}


@pytest.mark.parametrize("name", tiered(sorted(ROT_POLICIES), 0))  # 3-4 s each; the fast tier decodes the SPEC case
def test_cross_framework_decode_with_rotated_keys(name):
    """As test_decode_parity's cross-framework decode (same tolerance as q4_0 there), with the
    prompt in chunks so both cached-attention paths read the rotated streams."""
    cfg = rot_config(name)
    policy = parse_policy(ROT_POLICIES[name])
    plain = dataclasses.replace(policy, rotate=())
    tol = 1e-4
    state = init_like_state(cfg, 12)
    jm, tm = build_jax(cfg, state), build_torch(cfg, state)
    tokens = random_tokens(cfg, 2, 19, seed=5)
    dj, _ = run_jax(jm, jkv.init_cache(cfg, policy, 2, 19), tokens, 6)
    dt, _ = run_torch(tm, tkv.init_cache(cfg, policy, 2, 19), tokens, 6)
    assert np.abs(dj).max() > 0.3
    assert np.abs(dj - dt).max() <= tol
    full = np.asarray(jm(tokens))
    assert np.abs(dj - full).max() > 10 * tol  # the quantized cache really changes the logits
    dp, _ = run_torch(tm, tkv.init_cache(cfg, plain, 2, 19), tokens, 6)
    assert np.abs(dt - dp).max() > tol  # and the rotation changes what it stores


def test_spec_case_k_sem_q4_rot_k_geo_q8_rot_decode_logits():
    """The brief's policy through decode_logits (prefill, then one token at a time)."""
    cfg = make_config("decoupled", ("null",), sem_dim=24, geo_dim=48)
    policy = parse_policy("k_sem=q4_0+rot,k_geo=q8_0+rot")
    assert policy.rotate == ("k_sem", "k_geo") and rotation_dims(cfg, policy) == {"k_sem": 4, "k_geo": 8}
    state = init_like_state(cfg, 12)
    tokens = random_tokens(cfg, 2, 19, seed=5)
    jm, tm = build_jax(cfg, state), build_torch(cfg, state)
    dj = np.asarray(jax_model.decode_logits(jm, tokens, prefill=5, policy=policy, decode_block=6))
    dt = torch_ref.decode_logits(tm, tokens, prefill=5, policy=policy, decode_block=6).numpy()
    assert np.abs(dj - dt).max() <= 1e-4


# ---- refusals and accounting -------------------------------------------------------------------

@pytest.mark.parametrize("mode,text,needle", [
    ("decoupled", "k_sem=q4_0+rot", "k_sem+rot needs a power-of-two head dim; k_sem has head dim 3 (18 channels over 6 heads)"),
    ("decoupled", "k_sem=q4_0,k_geo=q8_0+rot", None),  # geo head dim 4: fine
    ("gqa", "k=q8_0+rot", "k+rot needs a power-of-two head dim; k has head dim 6 (12 channels over 2 heads)"),
    ("standard", "k=nf4+rot", "head dim 10"),
])
def test_non_power_of_two_head_dim_is_one_line(mode, text, needle):
    cfg = make_config(mode)
    policy = parse_policy(text)
    state = random_state(cfg)
    calls = (lambda: jkv.init_cache(cfg, policy, 1, 8), lambda: tkv.init_cache(cfg, policy, 1, 8),
             lambda: jax_model.decode_logits(build_jax(cfg, state), np.zeros((1, 4), np.int64), prefill=2,
                                             policy=policy),
             lambda: torch_ref.decode_logits(build_torch(cfg, state), np.zeros((1, 4), np.int64), prefill=2,
                                             policy=policy))
    for call in calls:
        if needle is None:
            call()
            continue
        with pytest.raises(UserError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(ROT_POLICIES))
def test_rotation_keeps_the_storage(name):
    cfg = rot_config(name)
    policy = parse_policy(ROT_POLICIES[name])
    plain = dataclasses.replace(policy, rotate=())
    for batch, max_len in ((1, 7), (3, 40)):
        want = kv_bytes(cfg, max_len, batch, policy)["total_bytes"]
        assert want == kv_bytes(cfg, max_len, batch, plain)["total_bytes"]
        for kvc in (jkv, tkv):
            rot, ref = kvc.init_cache(cfg, policy, batch, max_len), kvc.init_cache(cfg, plain, batch, max_len)
            assert kvc.nbytes(rot) == kvc.nbytes(ref) == want
            for a, b in zip(rot.layers[0].values(), ref.layers[0].values()):
                assert a.spec.rotated == (a.spec.name in policy.rotate) and not b.spec.rotated
                assert (a.rot_dim > 0) == a.spec.rotated and b.rot_dim == 0
                for key in ("data", "scale", "ring"):
                    x, y = getattr(a, key), getattr(b, key)
                    assert (x is None) == (y is None)
                    if x is not None:
                        assert tuple(x.shape) == tuple(y.shape) and str(x.dtype) == str(y.dtype)


def test_alloc_stream_refuses_a_mismatched_rot_dim():
    spec = stream_spec("k", "q4_0", 24, 8, 0, 8, rotated=True)
    for kvc in (jkv, tkv):
        with pytest.raises(ValueError, match="rot_dim"):
            kvc.alloc_stream(spec, 1, 8)  # rotated, but no head dim
        with pytest.raises(ValueError, match="rot_dim"):
            kvc.alloc_stream(spec, 1, 8, rot_dim=3)  # not a power of two
        with pytest.raises(ValueError, match="rot_dim"):
            kvc.alloc_stream(dataclasses.replace(spec, rotated=False), 1, 8, rot_dim=8)
