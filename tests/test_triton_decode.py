"""The fused Triton decode kernel (torch_ref/triton_decode.py) equals `cached_attend` on caches
built through the real write path: every cache kind, per-stream mixes, windows 0/1/128 with
lengths below and above them, null attention, the four attention modes, batch 1 and 3, a few
queries per row, rotated key streams, one-pass and split-K; and a model decodes the same with the
kernel switched on. Run with Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the
kernels are first decorated), so the dims are tiny."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from tests.support import TRITON_ONLY_ON_LINUX, torch_attention_case

# triton.jit reads TRITON_INTERPRET when it decorates a function, and triton.language decorates its
# own helpers (tl.zeros, tl.sum, ...) on import: the variable must be set before triton is first
# imported. Set it only for that import (and for this module's tests, below), so other test
# modules do not see it.
if "triton" not in sys.modules:
    _old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton", reason=TRITON_ONLY_ON_LINUX)
        import triton.language as tl
    finally:
        if _old_env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _old_env
else:
    triton = pytest.importorskip("triton", reason=TRITON_ONLY_ON_LINUX)
    import triton.language as tl

import torch_ref
from bench.parity_cases import build_torch, make_config, random_state, random_tokens
from dba.kvspec import KVPolicy
from torch_ref import triton_decode
from torch_ref.cached_attention import cached_attend

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.slow,  # the kernel in its interpreter: slow
    pytest.mark.skipif(type(tl.zeros).__name__ != "InterpretedFunction",
                       reason="triton was imported before this module without TRITON_INTERPRET=1; run this file "
                              "on its own or with TRITON_INTERPRET=1"),
]


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    """The kernels run interpreted on CPU tensors (`triton_decode` decorates them on first use
    and checks the variable on every call)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


# id: (key streams {name: (kind, qblock, head dim, rotated)}, v (kind, qblock, head dim), window,
#      length, null, batch, kv-heads, query heads per kv-head, queries per row, mode, use_dot)
CASES = {
    "standard-fp32": ({"k": ("fp32", 0, 10, False)}, ("fp32", 0, 10), 0, 40, False, 1, 3, 1, 1, "one_pass", None),
    "bottleneck-fp16-null-b3": ({"k": ("fp16", 0, 6, False)}, ("fp16", 0, 6), 0, 57, True, 3, 2, 1, 1,
                                "two_pass", None),
    "gqa-q8_0-w1-null": ({"k": ("q8_0", 8, 10, False)}, ("q8_0", 5, 6), 1, 100, True, 1, 2, 3, 1, "two_pass", None),
    "gqa-q4_0-w128-above": ({"k": ("q4_0", 6, 6, False)}, ("q4_0", 0, 6), 128, 300, False, 1, 1, 4, 1,
                            "two_pass", None),
    "decoupled-v29mix-w128-above-b3": ({"k_sem": ("q4_0", 0, 3, False), "k_geo": ("q8_0", 0, 4, False)},
                                       ("q4_0", 0, 6), 128, 150, True, 3, 2, 1, 1, "one_pass", None),
    "decoupled-nf4-w128-below": ({"k_sem": ("nf4", 4, 3, False), "k_geo": ("nf4", 0, 4, False)},
                                 ("nf4", 7, 6), 128, 77, True, 1, 2, 1, 1, "two_pass", None),
    "decoupled-mix-w0-T3-auto": ({"k_sem": ("nf4", 0, 3, False), "k_geo": ("fp16", 0, 4, False)},
                                 ("q8_0", 5, 6), 0, 123, False, 1, 2, 1, 3, "auto", None),
    "standard-q4_0rot-w4-null": ({"k": ("q4_0", 8, 8, True)}, ("q8_0", 0, 6), 4, 90, True, 1, 2, 1, 1,
                                 "one_pass", None),
    "decoupled-q8rot-dot-T2-b3": ({"k_sem": ("fp32", 0, 16, False), "k_geo": ("q8_0", 0, 16, True)},
                                  ("q4_0", 0, 16), 1, 70, True, 3, 1, 2, 2, "two_pass", True),
}


def _case(case, seed=0):
    keys, v, res, length, null, b, n_kv, g, t, _, _ = case
    # slots past `length` hold zeros and must be ignored
    return torch_attention_case(keys, v, res, length, length + 5, null, b, n_kv, g, t, seed)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_cached_attend(name):
    case = CASES[name]
    q, streams, q_start, length, null_kv, n_kv, key_names = _case(case)
    kw = {"n_kv_head": n_kv, "key_names": key_names}
    assert triton_decode.unsupported_reason(q, streams, **kw) is None
    ref = cached_attend(q, streams, q_start, length, null_kv, decode_block=16, **kw)
    out = triton_decode.fused_attend(q, streams, q_start, length, null_kv, mode=case[9], use_dot=case[10],
                                     block_n=16, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).abs().max() <= 1e-5
    assert ref.abs().max() > 0.05


def test_modes_and_dispatch_agree():
    """one_pass, two_pass (explicit small splits, one split past the end) and the cached_attend
    switch give the same output; fp16 queries come back as fp16."""
    q, streams, q_start, length, null_kv, n_kv, key_names = _case(CASES["gqa-q8_0-w1-null"], seed=3)
    kw = {"n_kv_head": n_kv, "key_names": key_names}
    ref = cached_attend(q, streams, q_start, length, null_kv, decode_block=32, **kw)
    a = triton_decode.fused_attend(q, streams, q_start, length, null_kv, mode="one_pass", block_n=8, **kw)
    b = triton_decode.fused_attend(q, streams, q_start, length, null_kv, mode="two_pass", block_n=8, chunk=24, **kw)
    c = triton_decode.decode_attend("triton", q, streams, q_start, length, null_kv, decode_block=32, **kw)
    for out in (a, b, c):
        assert (out - ref).abs().max() <= 1e-5
    h = triton_decode.fused_attend(q.half(), streams, q_start, length, null_kv, mode="two_pass", **kw)
    assert h.dtype == torch.float16
    assert (h.float() - cached_attend(q.half(), streams, q_start, length, null_kv, decode_block=32,
                                      **kw).float()).abs().max() <= 2e-3


def test_unsupported_falls_back_with_a_warning():
    q, streams, q_start, length, _, n_kv, key_names = _case(CASES["standard-fp32"])
    many = torch.randn(1, 3, 65, 10)  # 65 query rows per kv-head: more than one program holds
    kw = {"n_kv_head": n_kv, "key_names": key_names}
    why = triton_decode.unsupported_reason(many, streams, **kw)
    assert why and "65 query rows" in why
    with pytest.raises(ValueError, match="65 query rows"):
        triton_decode.fused_attend(many, streams, 0, length, None, **kw)
    with pytest.warns(UserWarning, match="kv-fused triton1pass: 65 query rows"):
        y = triton_decode.decode_attend("triton1pass", many, streams, 0, length, None, decode_block=16, **kw)
    assert torch.equal(y, cached_attend(many, streams, 0, length, None, decode_block=16, **kw))
    assert "key streams" in triton_decode.unsupported_reason(q, streams, n_kv_head=n_kv, key_names=("k", "k", "k"))
    with pytest.raises(ValueError, match="kv_fused 'cuda'"):
        triton_decode.decode_attend("cuda", q, streams, q_start, length, None, decode_block=16, **kw)
    assert triton_decode.triton_available()


@pytest.mark.parametrize("mode,options,policy,kernel,batch,prefill", [
    ("decoupled", ("null",), KVPolicy(kind="q4_0", qblock=6, residual=4), "triton2pass", 3, 4),
    ("gqa", ("null",), KVPolicy(kind="q8_0", qblock=5, residual=3, v="nf4"), "triton1pass", 1, 0),
    ("standard", (), KVPolicy(kind="nf4", residual=0, rotate=("k",)), "triton", 1, 4),
    ("bottleneck", ("null",), KVPolicy(kind="fp16"), "triton", 1, 4),
], ids=["decoupled-q4_0-2pass-b3", "gqa-q8nf4-1pass-prefill0", "standard-nf4rot-auto", "bottleneck-fp16"])
def test_decode_logits_with_the_kernel(monkeypatch, mode, options, policy, kernel, batch, prefill):
    # standard with a rotated k: a power-of-two head dim, 48/6 = 8
    overrides = {"d_model": 48, "embed_dim": 48} if mode == "standard" else {}
    cfg = make_config(mode, options, n_layer=1, **overrides)
    model = build_torch(cfg, random_state(cfg, 4))
    tokens = random_tokens(cfg, batch, 10, seed=2)
    ref = torch_ref.decode_logits(model, tokens, prefill=prefill, policy=policy, decode_block=4)
    calls = []
    real = triton_decode.fused_attend
    monkeypatch.setattr(triton_decode, "fused_attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback
        out = torch_ref.decode_logits(model, tokens, prefill=prefill, policy=policy, decode_block=4, kv_fused=kernel)
    assert len(calls) == 10 - prefill
    assert (out - ref).abs().max() <= 1e-5
    assert triton_decode.cache_attention("none") is cached_attend
    with pytest.raises(ValueError, match="kv_fused 'pallas'"):
        triton_decode.cache_attention("pallas")
