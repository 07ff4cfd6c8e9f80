"""Model properties in both frameworks: causality, RoPE, mixed precision, compile-once, imports."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_model
from jax_model import layers as jl
from bench.parity_cases import build_jax, build_torch, make_config, random_state, random_tokens
from torch_ref import layers as tl


@pytest.mark.parametrize("mode,options", [("decoupled", ("null",)), ("gqa", ()), ("standard", ("tie_qk",)),
                                          ("bottleneck", ("null", "embed"))])
def test_causality_both_frameworks(mode, options):
    cfg = make_config(mode, options)
    state = random_state(cfg, 4)
    tm, jm = build_torch(cfg, state), build_jax(cfg, state)
    tokens = random_tokens(cfg, 2, 15)
    t = 9
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
    for run in (lambda x: tm(x).detach().numpy(), lambda x: np.asarray(jm(x))):
        a, b = run(tokens), run(changed)
        assert np.abs(a[:, :t] - b[:, :t]).max() <= 1e-6
        assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-3


@pytest.mark.slow
def test_gradient_causality_jax():
    """d loss(position t) / d embedding(position s) is zero for s > t."""
    cfg = make_config("decoupled", ("null",))
    jm = build_jax(cfg, random_state(cfg, 5))
    tokens = jnp.asarray(random_tokens(cfg, 1, 12))
    t = 5

    def loss_at_t(x_emb):
        positions = jnp.arange(tokens.shape[1])
        x = x_emb
        for blk in jm.blocks:
            x, _ = blk(x, positions)
        return jm.unembed(x)[0, t].sum()

    g = jax.grad(loss_at_t)(jm.embed(tokens))
    assert float(jnp.abs(g[0, t + 1:]).max()) == 0.0
    assert float(jnp.abs(g[0, : t + 1]).max()) > 0.0


def rope_closed_form(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotate pair (i, i + r/2) by position * base**(-2i/r), in float64."""
    r = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for p_idx, p in enumerate(positions):
        for i in range(r // 2):
            theta = p * base ** (-2.0 * i / r)
            c, s = np.cos(theta), np.sin(theta)
            a, b = x[..., p_idx, i], x[..., p_idx, i + r // 2]
            out[..., p_idx, i] = a * c - b * s
            out[..., p_idx, i + r // 2] = a * s + b * c
    return out


@pytest.mark.parametrize("r,base", [(4, 10000.0), (10, 500.0)])
def test_rope_matches_closed_form(r, base):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 7, r)).astype(np.float32)
    positions = np.array([0, 1, 2, 5, 31, 100, 1000])
    want = rope_closed_form(x, positions, base)
    cos, sin = jl.rope_cos_sin(r, base, jnp.asarray(positions))
    got_j = np.asarray(jl.apply_rope(jnp.asarray(x), cos, sin))
    cos_t, sin_t = tl.rope_cos_sin(r, base, torch.as_tensor(positions))
    got_t = tl.apply_rope(torch.as_tensor(x), cos_t, sin_t).numpy()
    assert np.abs(got_j - want).max() <= 5e-5  # fp32 angles at position 1000
    assert np.abs(got_t - want).max() <= 5e-5
    assert np.abs(got_j - got_t).max() <= 5e-5


def test_rope_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(1, 1, 1, 8)).astype(np.float32), rng.normal(size=(1, 1, 1, 8)).astype(np.float32)

    def score(pq, pk):
        cq, sq = jl.rope_cos_sin(8, 10000.0, jnp.asarray([pq]))
        ck, sk = jl.rope_cos_sin(8, 10000.0, jnp.asarray([pk]))
        return float((jl.apply_rope(jnp.asarray(q), cq, sq) * jl.apply_rope(jnp.asarray(k), ck, sk)).sum())

    assert abs(score(7, 3) - score(17, 13)) <= 1e-5
    assert abs(score(7, 3) - score(7, 4)) > 1e-4


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("mode", ["decoupled", "gqa"])
def test_bf16_compute_close_to_fp32_by_kl(mode):
    cfg = make_config(mode, ("null",))
    state = random_state(cfg, 6)
    tokens = random_tokens(cfg, 2, 20)
    ref = np.asarray(build_jax(cfg, state)(tokens), np.float64)
    bf = build_jax(cfg, state, dtype=jnp.bfloat16)
    out = bf(tokens)
    assert out.dtype == jnp.float32  # logits stay fp32 under bf16 compute
    kl = mean_kl(ref, np.asarray(out, np.float64))
    assert 0.0 < kl <= 1e-3
    tm = build_torch(cfg, state)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t_bf = tm(tokens).float().numpy()
    assert mean_kl(ref, t_bf.astype(np.float64)) <= 1e-3


def test_forward_compiles_once_per_shape(monkeypatch):
    cfg = make_config("decoupled")
    jm = build_jax(cfg, random_state(cfg))
    traces = []
    original = jax_model.DBAModel.forward
    monkeypatch.setattr(jax_model.DBAModel, "forward", lambda self, *a, **k: traces.append(1) or original(self, *a, **k))
    for _ in range(3):
        jm(random_tokens(cfg, 3, 23))
    assert len(traces) == 1
    jm(random_tokens(cfg, 3, 24))
    jm(random_tokens(cfg, 3, 24))
    assert len(traces) == 2


@pytest.mark.slow
def test_dropout_only_in_training_mode():
    cfg = make_config("decoupled", dropout=0.3)
    state = random_state(cfg)
    jm, tm = build_jax(cfg, state), build_torch(cfg, state)
    toks = random_tokens(cfg, 1, 9)
    assert np.array_equal(np.asarray(jm(toks)), np.asarray(jm(toks)))
    a = np.asarray(jm.forward(jnp.asarray(toks), deterministic=False))
    assert np.abs(a - np.asarray(jm(toks))).max() > 1e-4
    tm.train()
    with torch.no_grad():
        assert not torch.equal(tm(toks), tm(toks))
    tm.eval()
    with torch.no_grad():
        assert torch.equal(tm(toks), tm(toks))


@pytest.mark.slow
@pytest.mark.parametrize("stmt,forbidden", [
    ("import torch_ref, torch_ref.weights_io", "jax"),
    ("import jax_model, jax_model.weights_io, jax_model.layers", "torch"),
    ("import dba, dba.config, dba.weights, dba.weight_files", "torch"),
    ("import dba, dba.config, dba.weights, dba.weight_files", "jax"),
])
def test_import_boundaries(stmt, forbidden):
    code = f"import sys; {stmt}; sys.exit(1 if {forbidden!r} in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- an upcycled student's options, against models without them ----------------------------

def _logits(cfg, state, tokens):
    return np.asarray(build_jax(cfg, state)(tokens)), build_torch(cfg, state)(tokens).detach().numpy()


def test_grouped_decoupled_keys_equal_repeated_keys():
    """decoupled_kv_head=K: query head h reads kv head h // (H/K). The same model with K=H and each
    kv head's key/value weights (and nulls) repeated over its group gives the same logits."""
    cfg = make_config("decoupled", ("grouped", "null", "bias"))
    full_cfg = cfg.replace(decoupled_kv_head=None)
    state = random_state(cfg, 5)
    g = cfg.n_head // cfg.n_kv_head
    full = dict(state)
    for name, a in state.items():
        if any(s in name for s in ("k_sem", "k_geo", "v_proj", "v_null")) and "out_proj" not in name:
            width = a.shape[-1] if "_null" in name else a.shape[0]
            rows = a.reshape(-1) if "_null" in name else a
            per = rows.reshape(cfg.n_kv_head, width // cfg.n_kv_head, *rows.shape[1:])
            rep = np.repeat(per, g, axis=0).reshape(-1, *rows.shape[1:])
            full[name] = rep.reshape(1, 1, -1) if "_null" in name else rep
    tokens = random_tokens(cfg, 2, 67)
    for a, b in zip(_logits(cfg, state, tokens), _logits(full_cfg, full, tokens)):
        assert np.abs(a - b).max() <= 2e-5 and np.abs(a).max() > 0.3


def test_recorded_default_frequencies_equal_the_default_rope():
    from dba.rope import default_inv_freq

    cfg = make_config("decoupled", ("grouped", "null"))
    row = tuple(float(x) for x in default_inv_freq(cfg.rope_dim, cfg.rope_base))
    recorded = cfg.replace(rope_freqs=tuple(tuple(row for _ in range(cfg.n_kv_head)) for _ in range(cfg.n_layer)))
    state = random_state(cfg, 6)
    tokens = random_tokens(cfg, 1, 70)
    for a, b in zip(_logits(cfg, state, tokens), _logits(recorded, state, tokens)):
        assert np.abs(a - b).max() <= 1e-5


def test_recorded_frequencies_are_per_kv_head():
    """Kv head 0 rotating at table A and kv head 1 at table B: with the out_proj columns of one
    group's query heads zeroed, the model equals the one rotating every head at the other group's
    table, and differs from the one rotating at the wrong table (each group's queries and keys use
    their own kv head's frequencies)."""
    base = make_config("decoupled", ("grouped",), n_layer=1)
    pairs = base.rope_dim // 2
    table_a = tuple(float(x) for x in np.float32([0.9, 0.013])[:pairs])
    table_b = tuple(float(x) for x in np.float32([2.1, 0.31])[:pairs])
    mixed = base.replace(rope_freqs=((table_a, table_b),))
    state = random_state(base, 8)
    tokens = random_tokens(base, 1, 64)
    g, v_hd = base.n_head // base.n_kv_head, base.attn_dim // base.n_head
    for keep, same, other in ((0, table_a, table_b), (1, table_b, table_a)):
        st = dict(state)
        w = st["blocks.0.attn.out_proj.weight"].copy()
        cols = np.ones(base.attn_dim, bool)
        cols[keep * g * v_hd:(keep + 1) * g * v_hd] = False
        w[:, cols] = 0.0  # only the kept group's query heads reach the output
        st["blocks.0.attn.out_proj.weight"] = w
        got = _logits(mixed, st, tokens)
        want = _logits(base.replace(rope_freqs=((same, same),)), st, tokens)
        wrong = _logits(base.replace(rope_freqs=((other, other),)), st, tokens)
        for a, b, c in zip(got, want, wrong):
            assert np.abs(a - b).max() <= 1e-5
            assert np.abs(a - c).max() > 1e-3
