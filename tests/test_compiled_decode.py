"""The compiled torch decode step (torch_ref/compiled_decode.py): its fixed-shape attention equals
`cached_attend` on caches built through the real write path (every kind, per-stream mixes,
windows 0/1/128 with lengths below and above them, null attention, GQA, rotated keys, a few
queries per row, a capacity that is not a multiple of the block); a write at a tensor position
stores what a write at an int does; a model decodes the same tokens compiled as eager, with one
program for every position; and a failing compile falls back to the eager step with a warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from bench.parity_cases import build_torch, make_config, random_state, random_tokens
from dba.kvspec import KVPolicy, stream_spec
from torch_ref import decode
from torch_ref import kvcache as kvc
from tests.support import torch_attention_case
from torch_ref.cached_attention import cached_attend
from torch_ref.compiled_decode import CompiledDecoder, static_cached_attend


# id: (key streams {name: (kind, qblock, head dim, rotated)}, v (kind, qblock, head dim), window,
#      length, capacity, null, batch, kv-heads, query heads per kv-head, queries per row)
CASES = {
    "standard-fp32": ({"k": ("fp32", 0, 10, False)}, ("fp32", 0, 10), 0, 70, 75, False, 1, 3, 1, 1),
    "bottleneck-fp16-null-b3": ({"k": ("fp16", 0, 6, False)}, ("fp16", 0, 6), 0, 67, 80, True, 3, 2, 1, 1),
    "gqa-q8_0-w1-null": ({"k": ("q8_0", 8, 10, False)}, ("q8_0", 5, 6), 1, 100, 103, True, 1, 2, 3, 1),
    "gqa-q4_0-w128-above": ({"k": ("q4_0", 6, 6, False)}, ("q4_0", 0, 6), 128, 300, 333, False, 1, 1, 4, 1),
    "decoupled-v29mix-w128-above-b3": ({"k_sem": ("q4_0", 0, 3, False), "k_geo": ("q8_0", 0, 4, False)},
                                       ("q4_0", 0, 6), 128, 150, 151, True, 3, 2, 1, 1),
    "decoupled-nf4-w128-below": ({"k_sem": ("nf4", 4, 3, False), "k_geo": ("nf4", 0, 4, False)},
                                 ("nf4", 7, 6), 128, 77, 90, True, 1, 2, 1, 1),
    "decoupled-mix-w0-T3": ({"k_sem": ("nf4", 0, 3, False), "k_geo": ("fp16", 0, 4, False)},
                            ("q8_0", 5, 6), 0, 123, 130, False, 1, 2, 1, 3),
    "decoupled-mix-fp16-beside-ring": ({"k_sem": ("q4_0", 0, 3, False), "k_geo": ("fp16", 0, 4, False)},
                                       ("q4_0", 0, 6), 16, 90, 97, True, 2, 2, 2, 2),
    "standard-q4_0rot-w4-null": ({"k": ("q4_0", 8, 8, True)}, ("q8_0", 0, 6), 4, 90, 90, True, 1, 2, 1, 1),
}


def _case(case, seed=0):
    return torch_attention_case(*case, seed=seed)


@pytest.mark.parametrize("name", list(CASES))
def test_static_attention_equals_cached_attend(name):
    """Eagerly (the same function the compiled step traces): positions past `length` hold zeros
    or stale ring slots and must be masked; blocks of 16 over a capacity that is rarely a multiple."""
    q, streams, q_start, length, null_kv, n_kv, key_names = _case(CASES[name])
    kw = {"n_kv_head": n_kv, "key_names": key_names, "decode_block": 16}
    ref = cached_attend(q, streams, q_start, length, null_kv, **kw)
    out = static_cached_attend(q, streams, torch.tensor(q_start), torch.tensor(length), null_kv, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).abs().max() <= 1e-5
    assert ref.abs().max() > 0.05


@pytest.mark.parametrize("kind,residual", [("fp16", 0), ("q8_0", 5), ("q4_0", 4), ("nf4", 0)])
def test_write_at_a_tensor_position_stores_the_same(kind, residual):
    """Every stored tensor (codes, scales, ring) after writes at a 0-d tensor position equals the
    same writes at int positions, through a ring that wraps."""
    gen = torch.Generator().manual_seed(1)
    spec = stream_spec("k", kind, 12, 4, residual, 40)
    a, b = kvc.alloc_stream(spec, 2, 40), kvc.alloc_stream(spec, 2, 40)
    x = torch.randn(2, 40, 12, generator=gen)
    for start, n in [(0, 7), (7, 1), (8, 1), (9, 20), (29, 1), (30, 10)]:
        kvc.write(a, x[:, start:start + n], start)
        kvc.write(b, x[:, start:start + n], torch.tensor(start))
    for got, want in [(b.data, a.data), (b.scale, a.scale), (b.ring, a.ring)]:
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)


def _model_and_prompt(policy_kind: str):
    cfg = make_config("decoupled", ("null",), n_layer=1)
    model = build_torch(cfg, random_state(cfg, 4))
    return model, torch.as_tensor(random_tokens(cfg, 2, 70, seed=2))


@pytest.mark.slow  # traces and compiles (~5 s)
def test_compiled_decoder_decodes_as_eager_with_one_program(monkeypatch):
    """Traced whole (fullgraph) through AOTAutograd, without Inductor's C++ code generation (~25 s
    even for this model: `dba bench decode --backends torch-compile` and `dba bench v29` run it)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    model, prompt = _model_and_prompt("q4_0")
    policy = KVPolicy(kind="q4_0", qblock=8, residual=16)
    torch._dynamo.reset()
    with torch.no_grad():
        cache = kvc.init_cache(model.cfg, policy, 2, 90)
        logits, cache = decode.prefill(model, cache, prompt[:, :64], decode_block=32, last_only=True)
        ref_cache = copy.deepcopy(cache)
        dec = CompiledDecoder(model, decode_block=32)
        frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for i in range(64, 70):  # teacher-forced: the same tokens through both
            got, cache = dec.step(cache, prompt[:, i])
            want, ref_cache = decode.decode_step(model, ref_cache, prompt[:, i], decode_block=32)
            assert (got - want).abs().max() <= 1e-4, i
            assert cache.pos == ref_cache.pos == i + 1 and isinstance(cache.pos, int)
    assert dec.mode == "compiled" and dec.note is None and dec.compile_s > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 1  # no recompile per position


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    model, prompt = _model_and_prompt("q8_0")
    policy = KVPolicy(kind="q8_0", residual=8)
    with torch.no_grad():
        cache = kvc.init_cache(model.cfg, policy, 2, 72)
        _, cache = decode.prefill(model, cache, prompt[:, :64], decode_block=32, last_only=True)
        ref_cache = copy.deepcopy(cache)
        dec = CompiledDecoder(model, decode_block=32)

        def broken(*a, **k):
            raise RuntimeError("C++ compile error: no compiler here\nmore lines")

        monkeypatch.setattr(dec, "_fn", broken)
        with pytest.warns(UserWarning, match=r"compiled decode: RuntimeError: C\+\+ compile error: no compiler here; "
                                             r"decoding eagerly"):
            got, cache = dec.step(cache, prompt[:, 64])
        want, ref_cache = decode.decode_step(model, ref_cache, prompt[:, 64], decode_block=32)
        assert torch.equal(got, want) and cache.pos == 65
        assert dec.mode == "eager" and "no compiler here" in dec.note
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            got, cache = dec.step(cache, prompt[:, 65])
        want, _ = decode.decode_step(model, ref_cache, prompt[:, 65], decode_block=32)
        assert torch.equal(got, want)
