"""The JAX analysis pass equals the same quantities computed from torch_ref's attention
probabilities (same weights), for every attention mode: entropy, top-k, local and null mass,
sem/geo energy shares, effective rank and the Q projections' stable rank.

The torch side is written out independently here: it runs torch_ref's blocks, takes each selected
layer's queries, keys and null key from torch_ref.Attention, forms the probabilities with a plain
softmax, and evaluates the metric definitions in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.parity_cases import build_jax, build_torch, make_config, random_state, random_tokens
from tests.support import tiered
from train.analysis import AnalysisSpec, analyse

CASES = [("decoupled", ("null",)), ("decoupled", ("tie_qk",)), ("standard", ()), ("bottleneck", ("null",)),
         ("gqa", ("null",))]


def _torch_reference(tm, idx, layers, heads, topk, window):
    cfg = tm.cfg
    t = idx.shape[1]
    pos = torch.arange(t)
    out: dict[str, list] = {}
    with torch.no_grad():
        x = tm.embed(torch.as_tensor(idx))
        for li, block in enumerate(tm.blocks):
            if li in layers:
                a = block.attn
                h_in = block.ln1(x)
                q, kv = a.queries_and_kv(h_in, pos)  # q: (B, H, T, D)
                k, _ = a.kv_heads(kv)  # (B, K, T, D)
                k = k.repeat_interleave(cfg.n_head // k.shape[1], dim=1)
                s = (q @ k.transpose(-1, -2)).double().numpy()
                mask = np.tril(np.ones((t, t), bool))
                s = np.where(mask, s, -np.inf)
                null = a.null_kv()
                if null is not None:
                    s0 = torch.einsum("bhtd,hd->bht", q, null[0]).double().numpy()
                    full = np.concatenate([s0[..., None], s], -1)
                else:
                    full = s
                e = np.exp(full - full.max(-1, keepdims=True))
                pf = e / e.sum(-1, keepdims=True)
                p0 = pf[..., 0] if null is not None else np.zeros(pf.shape[:-1])
                p = pf[..., 1:] if null is not None else pf
                p, p0 = p[:, heads], p0[:, heads]
                with np.errstate(divide="ignore", invalid="ignore"):
                    ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), -1) - np.where(p0 > 0, p0 * np.log(p0), 0.0)
                out.setdefault("attn_entropy", []).append(ent.mean((0, 2)))
                out.setdefault("attn_topk_mass", []).append(np.sort(p, -1)[..., ::-1][..., :topk].sum(-1).mean((0, 2)))
                i, j = np.arange(t)[:, None], np.arange(t)[None, :]
                local = (i - j >= 0) & (i - j < window)
                out.setdefault("attn_local_mass", []).append((p * local).sum(-1).mean((0, 2)))
                if null is not None:
                    out.setdefault("attn_null_mass", []).append(p0.mean((0, 2)))
                logits = np.where(mask, s[:, heads], 0.0)[0]  # the attention logits, batch row 0
                out.setdefault("logits", []).append(logits)
                if cfg.attn_mode == "decoupled":
                    ds = cfg.sem_head_dim
                    ssem = (q[..., :ds] @ k[..., :ds].transpose(-1, -2)).double().numpy()[:, heads]
                    sgeo = (q[..., ds:] @ k[..., ds:].transpose(-1, -2)).double().numpy()[:, heads]
                    es = (np.where(mask, ssem, 0) ** 2).sum((0, 2, 3))
                    eg = (np.where(mask, sgeo, 0) ** 2).sum((0, 2, 3))
                    out.setdefault("sem_energy_ratio", []).append(es / (es + eg))
                    out.setdefault("scores_sem", []).append(np.where(mask, ssem, 0.0)[0])
                    out.setdefault("scores_geo", []).append(np.where(mask, sgeo, 0.0)[0])
                else:
                    out.setdefault("scores", []).append(logits)
                sv = np.linalg.svd(p[0], compute_uv=False)
                qn = sv / sv.sum(-1, keepdims=True)
                out.setdefault("attn_erank", []).append(np.exp(-np.sum(np.where(qn > 0, qn * np.log(qn), 0), -1)))
                ws = ([a.q_sem.weight, a.q_geo.weight] if cfg.attn_mode == "decoupled" else [a.q_proj.weight])
                srs = []
                for w in ws:
                    sw = np.linalg.svd(w.double().numpy(), compute_uv=False)
                    srs.append((sw ** 2).sum() / sw[0] ** 2)
                out.setdefault("proj_stable_rank", []).append(np.array(srs))
                out.setdefault("attn", []).append(p[0])
            x, _ = block(x, pos)
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("mode,options", tiered(CASES, 1, ids=[f"{m}-{'+'.join(o) or 'base'}" for m, o in CASES]))
def test_analysis_matches_torch_probabilities(mode, options):
    cfg = make_config(mode, options)
    state = random_state(cfg, seed=3)
    jm, tm = build_jax(cfg, state), build_torch(cfg, state)
    idx = random_tokens(cfg, 2, 31, seed=5)
    layers, heads = (0, cfg.n_layer - 1), (0, cfg.n_head - 1)
    spec = AnalysisSpec(level="full", every=1, max_tokens=31, layers=layers, heads=heads, topk=5,
                        local_window=7, save_scores=True)
    got = {k: np.asarray(v, np.float64) for k, v in analyse(jm, idx.astype(np.int32), spec).items()}
    want = _torch_reference(tm, idx, layers, list(heads), 5, 7)
    logits = want.pop("logits")
    for name, ref in want.items():  # the stored score maps included (save_scores)
        assert got[name].shape == ref.shape, name
        np.testing.assert_allclose(got[name], ref, rtol=2e-5, atol=2e-6, err_msg=name)
    assert np.abs(logits).max() > 0.1  # scores of a size that shows a wrong path
    if cfg.attn_mode == "decoupled":
        np.testing.assert_allclose(got["geo_energy_ratio"], 1.0 - want["sem_energy_ratio"], rtol=2e-5, atol=2e-6)
        # the stored per-path scores add up to the attention logits, whose softmax is the stored attn
        np.testing.assert_allclose(got["scores_sem"] + got["scores_geo"], logits, rtol=2e-5, atol=2e-6)
    else:
        np.testing.assert_allclose(got["scores"], logits, rtol=2e-5, atol=2e-6)
    assert ("attn_null_mass" in got) == cfg.null_attn
