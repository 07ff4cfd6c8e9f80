"""The attention analysis pass of `dba train --instrument basic|medium|full`.

Every `--analysis-every` steps one held-out validation sequence of `--analysis-max-tokens` tokens
goes through the model, and for the selected layers (`--analysis-layers`, negative indices count
from the end) and heads (`--analysis-heads`, or `all`) we measure how attention routes:

- `attn_entropy`: entropy (nats) of each query's distribution, the null key included;
- `attn_topk_mass`: probability on the `--analysis-topk` largest real keys;
- `attn_local_mass`: probability on the `--analysis-local-window` most recent keys (self included);
- `attn_null_mass`: probability on the learned null key (null attention only);
- `sem_energy_ratio` / `geo_energy_ratio` (decoupled): each path's share of the squared score
  energy sum(s_sem^2) / (sum(s_sem^2) + sum(s_geo^2)) over the causally visible entries;
- `attn_erank` (medium, full): effective rank exp(H(sigma / sum sigma)) of each head's T x T
  attention matrix (batch row 0), from its singular values;
- `proj_stable_rank` (medium, full): ||W||_F^2 / ||W||_2^2 of each selected layer's Q projections
  (q_sem and q_geo when decoupled).

Row metrics are averaged over queries, then over the selected (layer, head) pairs for the
`*_mean` values of the `analysis` event. Scores come from the model's own pieces
(`Attention.queries_and_kv`, `kv_heads`, `null_kv` and `layers.scores`), so a decoupled model is
analysed with the per-path scaling and learned temperature it trains with. The whole pass is one
jitted function per (sequence length, selection). The framework-free half (the selection, the
sequence, the reduction to the event's numbers) is dba/analysis_spec.py, shared with the torch
pass (torch_ref/analysis.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_model.layers import causal_mask, group_queries, null_scores, scores
from dba.analysis_spec import (  # noqa: F401 (re-exported: the framework-free half lives there)
    ANALYSIS_STREAM,
    PATH_METRICS,
    RANK_METRICS,
    ROW_METRICS,
    AnalysisSpec,
    analysis_tokens,
    parse_indices,
    spec_for,
    summarise,
)


# -- metric kernels (pure jnp; unit-tested on hand-built patterns) ------------------------------
def row_entropy(p_BHTL: jax.Array, p0_BHT: jax.Array | None = None) -> jax.Array:
    """Entropy (nats) of each row, the null probability counted as one more outcome."""
    h = -jnp.sum(jax.scipy.special.xlogy(p_BHTL, p_BHTL), axis=-1)
    if p0_BHT is not None:
        h = h - jax.scipy.special.xlogy(p0_BHT, p0_BHT)
    return h


def topk_mass(p_BHTL: jax.Array, k: int) -> jax.Array:
    k = min(int(k), p_BHTL.shape[-1])
    return jnp.sum(jax.lax.top_k(p_BHTL, k)[0], axis=-1)


def local_mass(p_BHTL: jax.Array, window: int) -> jax.Array:
    """Mass on keys j with 0 <= i - j < window (query i at absolute position L - T + i)."""
    t, n_keys = p_BHTL.shape[-2], p_BHTL.shape[-1]
    q_pos = jnp.arange(n_keys - t, n_keys)[:, None]
    dist = q_pos - jnp.arange(n_keys)[None, :]
    near = (dist >= 0) & (dist < window)
    return jnp.sum(jnp.where(near, p_BHTL, 0.0), axis=-1)


def effective_rank(svals: jax.Array) -> jax.Array:
    """exp(entropy of the normalised singular values) over the last axis (Roy & Vetterli 2007)."""
    s = jnp.maximum(svals, 0.0)
    q = s / jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-30)
    return jnp.exp(-jnp.sum(jax.scipy.special.xlogy(q, q), axis=-1))


def stable_rank(w: jax.Array) -> jax.Array:
    """||W||_F^2 / sigma_max(W)^2 of a 2-D matrix."""
    s = jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)
    return jnp.sum(jnp.square(s)) / jnp.maximum(jnp.square(s[0]), 1e-30)


# -- the pass ---------------------------------------------------------------------------------
def _layer_maps(attn, x_BTC: jax.Array, heads: tuple[int, ...], decoupled: bool) -> dict[str, jax.Array]:
    """Probabilities and scores of one attention layer for the selected heads, fp32."""
    cfg = attn.cfg
    t = x_BTC.shape[1]
    positions = jnp.arange(t)
    q_BHTD, streams = attn.queries_and_kv(x_BTC, positions)
    k_BKLD, _ = attn.kv_heads(streams)
    n_kv, h = k_BKLD.shape[1], q_BHTD.shape[1]
    gq = group_queries(q_BHTD, n_kv)
    sel = jnp.asarray(heads, jnp.int32)
    to_bhtl = lambda s: s.reshape(s.shape[0], h, t, -1)[:, sel]
    s = to_bhtl(scores(gq, k_BKLD))
    mask = causal_mask(t, t)
    s = jnp.where(mask, s, -jnp.inf)
    null = attn.null_kv()
    out: dict[str, jax.Array] = {}
    if null is not None:
        k_null = null[0].reshape(n_kv, h // n_kv, -1)
        s0 = null_scores(gq, k_null).reshape(s.shape[0], h, t)[:, sel]
        m = jnp.maximum(s.max(-1), s0)
        e, e0 = jnp.exp(s - m[..., None]), jnp.exp(s0 - m)
        den = e.sum(-1) + e0
        out["p"], out["p0"] = e / den[..., None], e0 / den
    else:
        out["p"] = jax.nn.softmax(s, axis=-1)
    if decoupled:
        ds = cfg.sem_head_dim
        s_sem = to_bhtl(scores(gq[..., :ds], k_BKLD[..., :ds]))
        s_geo = to_bhtl(scores(gq[..., ds:], k_BKLD[..., ds:]))
        out["s_sem"], out["s_geo"] = jnp.where(mask, s_sem, 0.0), jnp.where(mask, s_geo, 0.0)
    else:
        out["s"] = jnp.where(mask, s, 0.0)
    return out


def _q_kernels(attn, decoupled: bool) -> list[jax.Array]:
    names = ("q_sem", "q_geo") if decoupled else ("q_proj",)
    return [getattr(attn, n).kernel[...] for n in names]


def analyse(model, idx_BT: jax.Array, spec: AnalysisSpec) -> dict[str, jax.Array]:
    """The un-jitted pass: per-(layer, head) metrics (Ls, Hs) plus the maps to store."""
    cfg = model.cfg
    decoupled = cfg.attn_mode == "decoupled"
    positions = jnp.arange(idx_BT.shape[1])
    x = model.embed(idx_BT)
    per: dict[str, list] = {}
    keep = lambda k, v: per.setdefault(k, []).append(v)
    for li, block in enumerate(model.blocks):
        if li in spec.layers:
            maps = _layer_maps(block.attn, block.ln1(x), spec.heads, decoupled)
            p, p0 = maps["p"], maps.get("p0")
            keep("attn_entropy", row_entropy(p, p0).mean(axis=(0, 2)))
            keep("attn_topk_mass", topk_mass(p, spec.topk).mean(axis=(0, 2)))
            keep("attn_local_mass", local_mass(p, spec.local_window).mean(axis=(0, 2)))
            if p0 is not None:
                keep("attn_null_mass", p0.mean(axis=(0, 2)))
            if decoupled:
                e_sem = jnp.sum(jnp.square(maps["s_sem"]), axis=(0, 2, 3))
                e_geo = jnp.sum(jnp.square(maps["s_geo"]), axis=(0, 2, 3))
                tot = jnp.maximum(e_sem + e_geo, 1e-30)
                keep("sem_energy_ratio", e_sem / tot)
                keep("geo_energy_ratio", e_geo / tot)
            keep("attn", p[0])
            if p0 is not None:
                keep("attn_null", p0[0])
            if spec.ranks:
                sv = jnp.linalg.svd(p[0], compute_uv=False)  # (Hs, T)
                keep("svals", sv)
                keep("attn_erank", effective_rank(sv))
                keep("proj_stable_rank", jnp.stack([stable_rank(w) for w in _q_kernels(block.attn, decoupled)]))
            if spec.save_scores:
                for name in ("s_sem", "s_geo", "s"):
                    if name in maps:
                        keep("scores" + name[1:], maps[name][0])
        if li < max(spec.layers):  # later layers are not needed
            x, _ = block(x, positions)
    return {k: jnp.stack(v) for k, v in per.items()}


class Analyzer:
    """Jitted analysis of the current parameters on a fixed validation sequence."""

    def __init__(self, spec: AnalysisSpec, graphdef, rest, cfg):
        self.spec, self.cfg = spec, cfg
        self._graphdef, self._rest = graphdef, rest

        def run(params, idx_BT):
            model = nnx.merge(self._graphdef, params, self._rest)
            return analyse(model, idx_BT, spec)

        self._fn = jax.jit(run)

    def __call__(self, params, idx_BT: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(the event's scalar means and per-layer lists, the arrays for analysis.h5)."""
        return summarise(jax.device_get(self._fn(params, jnp.asarray(idx_BT, jnp.int32))), self.spec.level)
