"""Cached decode: equals the full forward, agrees across frameworks for every cache kind,
streams long caches block by block, and generation matches between JAX and torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_model
import torch_ref
from dba.errors import UserError
from dba.kvspec import KVPolicy, kv_bytes
from jax_model import kvcache as jkv
from bench.parity_cases import build_jax, build_torch, init_like_state, make_config, random_state, random_tokens
from tests.support import first_of_each, tiered

DECODE_CONFIGS = [
    ("decoupled", ("null",)), ("decoupled", ("tie_qk", "embed")), ("decoupled", ()),
    ("gqa", ("null",)), ("gqa", ("norope",)), ("standard", ("tie_qk",)), ("bottleneck", ("null", "gelu")),
    ("decoupled", ("grouped", "recorded", "null")),  # an upcycled student's layout
]
IDS = [f"{m}-{'+'.join(o) or 'base'}" for m, o in DECODE_CONFIGS]


def _framework(model):
    """jax_model or torch_ref: the package whose DBAModel `model` is."""
    return jax_model if isinstance(model, jax_model.DBAModel) else torch_ref


@pytest.mark.parametrize("mode,options", tiered(DECODE_CONFIGS, 1, ids=IDS))
def test_fp32_decode_equals_forward(mode, options):
    cfg = make_config(mode, options)
    state = random_state(cfg, 11)
    tm, jm = build_torch(cfg, state), build_jax(cfg, state)
    tokens = random_tokens(cfg, 2, 21)
    full = np.asarray(jm(tokens))
    policy = KVPolicy(kind="fp32")
    for prefill in ((0, 6) if mode == "decoupled" and options == ("null",) else (6,)):
        # decode_block 4 does not divide 21: the last block overlaps and is masked
        dj = np.asarray(jax_model.decode_logits(jm, tokens, prefill=prefill, policy=policy, decode_block=4))
        dt = torch_ref.decode_logits(tm, tokens, prefill=prefill, policy=policy, decode_block=4).numpy()
        assert np.abs(dj - full).max() <= 1e-5
        assert np.abs(dt - full).max() <= 1e-5


POLICIES = {
    "fp32": (KVPolicy(kind="fp32"), 1e-5),
    "fp16": (KVPolicy(kind="fp16"), 2e-5),
    "q8_0": (KVPolicy(kind="q8_0", qblock=8, residual=3), 1e-4),
    "q4_0": (KVPolicy(kind="q4_0", qblock=6, residual=4), 1e-4),  # decoupled: k_geo q8_0 (v29 default)
    "nf4": (KVPolicy(kind="nf4", qblock=0, residual=2), 1e-4),
    "hetero": (KVPolicy(kind="q8_0", qblock=5, residual=3, k="nf4", v="fp16", k_sem="q4_0", k_geo="nf4",
                        qblock_k_sem=4, qblock_v=7), 1e-4),
    "q4_no_window": (KVPolicy(kind="q4_0", qblock=32, residual=0), 1e-4),
}


# Pairwise: every policy meets at least two configs and every config at least two policies.
CROSS = [(DECODE_CONFIGS[(i + j * 3) % len(DECODE_CONFIGS)], p)
         for i, p in enumerate(POLICIES) for j in range(2)]


@pytest.mark.parametrize("config,policy_name", tiered(CROSS, first_of_each(lambda case: case[1]),
                                                      ids=[f"{m}-{'+'.join(o) or 'base'}-{p}" for (m, o), p in CROSS]))
def test_cross_framework_decode(config, policy_name):
    mode, options = config
    policy, tol = POLICIES[policy_name]
    cfg = make_config(mode, options)
    state = init_like_state(cfg, 12)
    tm, jm = build_torch(cfg, state), build_jax(cfg, state)
    tokens = random_tokens(cfg, 2, 19, seed=5)
    # prefill 5, window <= 4: decoding crosses the residual window; block 6 does not divide 19
    dj = np.asarray(jax_model.decode_logits(jm, tokens, prefill=5, policy=policy, decode_block=6))
    dt = torch_ref.decode_logits(tm, tokens, prefill=5, policy=policy, decode_block=6).numpy()
    assert np.abs(dj).max() > 0.3
    assert np.abs(dj - dt).max() <= tol
    if policy.kind not in ("fp32", "fp16"):  # the quantized cache really changes the logits
        full = np.asarray(jm(tokens))
        assert np.abs(dj - full).max() > 10 * tol


@pytest.mark.slow
def test_decode_block_size_does_not_change_results():
    cfg = make_config("decoupled", ("null",))
    jm = build_jax(cfg, init_like_state(cfg, 2))
    tokens = random_tokens(cfg, 1, 17)
    pol = KVPolicy(kind="q8_0", residual=4)
    a = np.asarray(jax_model.decode_logits(jm, tokens, prefill=3, policy=pol, decode_block=1))
    b = np.asarray(jax_model.decode_logits(jm, tokens, prefill=3, policy=pol, decode_block=5))
    c = np.asarray(jax_model.decode_logits(jm, tokens, prefill=3, policy=pol, decode_block=1024))
    assert np.abs(a - b).max() <= 1e-5 and np.abs(a - c).max() <= 1e-5


def test_window_reads_are_exact_fp16():
    """With a window covering everything, a q4_0 cache decodes like an fp16 cache."""
    cfg = make_config("gqa", ("null",))
    jm = build_jax(cfg, random_state(cfg, 3))
    tokens = random_tokens(cfg, 1, 15)
    a = np.asarray(jax_model.decode_logits(jm, tokens, prefill=4, policy=KVPolicy(kind="q4_0", residual=64)))
    b = np.asarray(jax_model.decode_logits(jm, tokens, prefill=4, policy=KVPolicy(kind="fp16")))
    assert np.abs(a - b).max() <= 1e-6


def test_decode_step_compiles_once_and_streams_the_cache():
    """The compiled decode step at 32k context keeps temporaries far below the dequantized K/V."""
    cfg = make_config("decoupled", ("null",), n_layer=1)
    jm = build_jax(cfg, random_state(cfg))
    max_len = 32_768
    policy = KVPolicy(kind="q4_0", residual=128)
    cache = jkv.init_cache(cfg, policy, 1, max_len)
    assert jkv.nbytes(cache) == kv_bytes(cfg, max_len, 1, policy)["total_bytes"]
    graphdef, params = nnx.split(jm)

    def step(params, cache, tok):
        return nnx.merge(graphdef, params).forward_cached(tok[:, None], cache, fresh=False, decode_block=256)

    compiled = jax.jit(step).lower(params, cache, jnp.zeros((1,), jnp.int32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    full_kv_fp32 = max_len * sum(cfg.kv_streams().values()) * 4 * cfg.n_layer
    assert temp < full_kv_fp32 / 20, (temp, full_kv_fp32)


def test_decode_step_is_not_retraced_per_token(monkeypatch):
    cfg = make_config("standard")
    jm = build_jax(cfg, random_state(cfg))
    traces = []
    import jax_model.decode as jd

    original = jax_model.DBAModel.forward_cached
    monkeypatch.setattr(jax_model.DBAModel, "forward_cached",
                        lambda self, *a, **k: traces.append(1) or original(self, *a, **k))
    cache = jkv.init_cache(cfg, KVPolicy(kind="q8_0"), 2, 16)
    logits, cache = jd.prefill(jm, cache, jnp.zeros((2, 3), jnp.int32), fresh=True, decode_block=8)
    for i in range(5):
        kw = {"kv_fused": "none"} if i % 2 else {}  # the default and the explicit mode: one function
        logits, cache = jd.decode_step(jm, cache, jnp.full((2,), i, jnp.int32), decode_block=8, **kw)
    assert int(cache.pos) == 8
    assert len(traces) == 2  # one prefill trace, one decode-step trace


@pytest.mark.parametrize("mode,options", tiered([("decoupled", ("null",)), ("gqa", ()), ("bottleneck", ("tie_qk",))], 1))
def test_greedy_generation_matches_across_frameworks(mode, options):
    cfg = make_config(mode, options)
    state = random_state(cfg, 21)
    tm, jm = build_torch(cfg, state), build_jax(cfg, state)
    prompt = random_tokens(cfg, 3, 5)
    pol = KVPolicy(kind="fp32")
    gj = np.asarray(jax_model.generate(jm, prompt, max_new_tokens=12, policy=pol, temperature=0.0))
    gt = torch_ref.generate(tm, prompt, max_new_tokens=12, policy=pol, temperature=0.0).numpy()
    assert gj.shape == (3, 17) and np.array_equal(gj[:, :5], prompt)
    assert np.array_equal(gj, gt)
    # greedy generation is what the full forward predicts, step by step
    full = np.asarray(jm(gj))
    assert np.array_equal(full[:, 4:-1].argmax(-1), gj[:, 5:])
    top1 = np.asarray(jax_model.generate(jm, prompt, max_new_tokens=12, policy=pol, top_k=1))
    assert np.array_equal(top1, gj)


@pytest.mark.slow
def test_sampling_is_reproducible_and_filters():
    cfg = make_config("decoupled", ("null",))
    state = random_state(cfg, 22)
    tm, jm = build_torch(cfg, state), build_jax(cfg, state)
    prompt = random_tokens(cfg, 2, 4)
    kw = dict(max_new_tokens=16, policy=KVPolicy(kind="q4_0", residual=4), temperature=1.3, top_k=20, top_p=0.9)
    a = np.asarray(jax_model.generate(jm, prompt, seed=7, **kw))
    assert np.array_equal(a, np.asarray(jax_model.generate(jm, prompt, seed=7, **kw)))
    assert not np.array_equal(a, np.asarray(jax_model.generate(jm, prompt, seed=8, **kw)))
    t1 = torch_ref.generate(tm, prompt, seed=7, **kw)
    assert torch.equal(t1, torch_ref.generate(tm, prompt, seed=7, **kw))
    eos = int(a[0, 6])
    stopped = np.asarray(jax_model.generate(jm, prompt, seed=7, eos_id=eos, **kw))
    first = np.argmax(stopped[0, 4:] == eos) + 4
    assert (stopped[0, first:] == eos).all()


def test_top_k_and_top_p_filters_agree():
    from jax_model.sampling import filter_logits as jf
    from torch_ref.sampling import filter_logits as tf

    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    for top_k, top_p in [(5, None), (None, 0.5), (10, 0.8), (None, 1.0)]:
        a = np.asarray(jf(jnp.asarray(logits), 0.7, top_k, top_p))
        b = tf(torch.as_tensor(logits), 0.7, top_k, top_p).numpy()
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        kept = np.isfinite(a).sum(-1)
        if top_k:
            assert (kept <= top_k).all()
        if top_p == 0.5:
            p = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum(-1, keepdims=True)
            for row in range(4):  # the kept set is the smallest prefix with mass >= top_p
                order = np.argsort(-p[row])
                need = np.searchsorted(np.cumsum(p[row][order]), 0.5) + 1
                assert kept[row] == need


@pytest.mark.parametrize("call,needle", [
    (lambda m, g: g(m, np.zeros((1, 4), np.int64), 4, KVPolicy(kind="q3_k")), "q3_k"),
    (lambda m, g: g(m, np.zeros((1, 4), np.int64), 4, KVPolicy(kind="q8_0", qblock=-4)), "-4"),
    (lambda m, g: g(m, np.zeros((1, 9), np.int64), 4, None, max_len=10), "13 tokens do not fit"),
    (lambda m, g: g(m, np.zeros((1, 4), np.int64), 4, None, temperature=-1.0), "temperature"),
    (lambda m, g: g(m, np.zeros((1, 4), np.int64), 4, None, top_p=0.0), "top_p"),
    (lambda m, g: _framework(m).decode_logits(m, np.zeros((1, 9), np.int64), prefill=3, max_len=5), "do not fit"),
    (lambda m, g: _framework(m).decode_logits(m, np.zeros((1, 9), np.int64), prefill=12), "prefill=12"),
])
def test_bad_generation_inputs_raise_one_line(call, needle):
    cfg = make_config("decoupled")
    state = random_state(cfg)
    for model, gen in ((build_jax(cfg, state), jax_model.generate), (build_torch(cfg, state), torch_ref.generate)):
        with pytest.raises(UserError) as e:
            call(model, gen)
        assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_cache_overflow_is_refused(framework):
    """Both frameworks refuse to run past max_len with the same one-line UserError, from the
    prefill and the decode step alike (JAX: in the host-side wrappers of the jitted cores)."""
    import torch_ref.decode as td
    from torch_ref import kvcache as tkv

    import jax_model.decode as jd

    cfg = make_config("standard")
    state = random_state(cfg)
    if framework == "jax":
        model, kvc, dec, tokens = build_jax(cfg, state), jkv, jd, lambda t: jnp.zeros((1, t), jnp.int32)
    else:
        model, kvc, dec, tokens = build_torch(cfg, state), tkv, td, lambda t: torch.zeros((1, t), dtype=torch.long)
    cache = kvc.init_cache(cfg, KVPolicy(kind="fp16"), 1, 6)
    _, cache = dec.prefill(model, cache, tokens(5))
    with pytest.raises(UserError, match="overflow") as e:
        dec.prefill(model, cache, tokens(2))
    assert str(e.value) == "KV cache overflow: 5 cached + 2 new tokens > max_len=6"
    _, cache = dec.decode_step(model, cache, tokens(1)[:, 0])
    with pytest.raises(UserError, match="KV cache overflow: 6 cached \\+ 1 new tokens > max_len=6"):
        dec.decode_step(model, cache, tokens(1)[:, 0])
    with pytest.raises(UserError, match="KV cache overflow"):  # the model's cached path, called eagerly
        model.forward_cached(tokens(1), cache, fresh=False)


@pytest.mark.parametrize("bad,needle", [
    (np.zeros((1, 4), np.float32), "shape (1, 4) dtype float32"),
    (np.zeros((1, 2, 3), np.int64), "shape (1, 2, 3) dtype int64"),
    (np.zeros((2, 3), bool), "shape (2, 3) dtype bool"),
])
def test_as_tokens_is_one_check_in_both_frameworks(bad, needle):
    cfg = make_config("standard")
    state = random_state(cfg)
    for model in (build_jax(cfg, state), build_torch(cfg, state)):
        assert tuple(model.as_tokens([3, 1, 2]).shape) == (1, 3)
        assert tuple(model.as_tokens(np.zeros((2, 5), np.uint16)).shape) == (2, 5)
        for call in (model.as_tokens, model, lambda t: _framework(model).decode_logits(model, t, prefill=1)):
            with pytest.raises(UserError) as e:
                call(bad)
            msg = str(e.value)
            assert msg == f"tokens must be integer ids shaped (B, T), got {needle}", msg
