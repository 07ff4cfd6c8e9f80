"""The attention analysis pass of train/analysis.py, in torch on a torch_ref `DBAModel`, for
`dba train --backend torch`. Never imports JAX.

Same selection (`AnalysisSpec` of dba/analysis_spec.py: layers, heads, top-k, local window,
level), same keys and the same definitions, per selected (layer, head), averaged over queries:

- `attn_entropy`: entropy (nats) of each query's distribution, the null key included;
- `attn_topk_mass`: probability on the `topk` largest real keys;
- `attn_local_mass`: probability on the `local_window` most recent keys (self included);
- `attn_null_mass`: probability on the learned null key (null attention only);
- `sem_energy_ratio` / `geo_energy_ratio` (decoupled): each path's share of the squared score
  energy over the causally visible entries;
- `attn_erank` (medium, full): exp(H(sigma / sum sigma)) of each head's T x T attention matrix
  (batch row 0); `proj_stable_rank`: ||W||_F^2 / ||W||_2^2 of the Q projections;
- the maps: `attn` (and `attn_null`), `svals`, and with save_scores `scores_sem`/`scores_geo`
  (decoupled) or `scores`.

Scores come from the model's own pieces (`Attention.queries_and_kv`, `kv_heads`, `null_kv`), in
fp32 whatever the parameter dtype, so a decoupled model is analysed with its per-path scaling
and learned temperature. parity_tests/test_torch_train_parity.py checks it against the JAX pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torch_ref.layers import causal_mask
from dba.analysis_spec import AnalysisSpec, summarise

__all__ = ["Analyzer", "analyse", "effective_rank", "local_mass", "row_entropy", "stable_rank", "topk_mass"]


# -- metric kernels -------------------------------------------------------------------------
def row_entropy(p_BHTL: torch.Tensor, p0_BHT: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (nats) of each row, the null probability counted as one more outcome."""
    h = -torch.special.xlogy(p_BHTL, p_BHTL).sum(-1)
    if p0_BHT is not None:
        h = h - torch.special.xlogy(p0_BHT, p0_BHT)
    return h


def topk_mass(p_BHTL: torch.Tensor, k: int) -> torch.Tensor:
    k = min(int(k), p_BHTL.shape[-1])
    return torch.topk(p_BHTL, k, dim=-1).values.sum(-1)


def local_mass(p_BHTL: torch.Tensor, window: int) -> torch.Tensor:
    """Mass on keys j with 0 <= i - j < window (query i at absolute position L - T + i)."""
    t, n_keys = p_BHTL.shape[-2], p_BHTL.shape[-1]
    dev = p_BHTL.device
    dist = torch.arange(n_keys - t, n_keys, device=dev)[:, None] - torch.arange(n_keys, device=dev)[None, :]
    near = (dist >= 0) & (dist < window)
    return torch.where(near, p_BHTL, torch.zeros((), dtype=p_BHTL.dtype, device=dev)).sum(-1)


def _svdvals(a: torch.Tensor) -> torch.Tensor:
    if a.device.type == "mps":  # no SVD on MPS: a few small matrices on the host
        return torch.linalg.svdvals(a.cpu()).to(a.device)
    return torch.linalg.svdvals(a)


def effective_rank(svals: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised singular values) over the last axis (Roy & Vetterli 2007)."""
    s = torch.clamp(svals, min=0.0)
    q = s / torch.clamp(s.sum(-1, keepdim=True), min=1e-30)
    return torch.exp(-torch.special.xlogy(q, q).sum(-1))


def stable_rank(w: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 / sigma_max(W)^2 of a 2-D matrix (either orientation)."""
    s = _svdvals(w.float())
    return (s * s).sum() / torch.clamp(s[0] * s[0], min=1e-30)


# -- the pass ---------------------------------------------------------------------------------
def _layer_maps(attn, x_BTC: torch.Tensor, heads: list[int], decoupled: bool) -> dict[str, torch.Tensor]:
    """Probabilities and scores of one attention layer for the selected heads, fp32."""
    cfg = attn.cfg
    t = x_BTC.shape[1]
    positions = torch.arange(t, device=x_BTC.device)
    q, streams = attn.queries_and_kv(x_BTC, positions)
    k, _ = attn.kv_heads(streams)
    h, n_kv = q.shape[1], k.shape[1]
    q = q.float()
    k = k.float().repeat_interleave(h // n_kv, dim=1)  # query head i uses kv head i // (H / K)
    sel = torch.as_tensor(heads, dtype=torch.long, device=q.device)
    mask = causal_mask(t, t, q.device)
    s = torch.matmul(q, k.transpose(-1, -2))[:, sel]
    s = s.masked_fill(~mask, float("-inf"))
    out: dict[str, torch.Tensor] = {}
    null = attn.null_kv()
    if null is not None:
        s0 = torch.einsum("bhtd,hd->bht", q, null[0].float())[:, sel]
        m = torch.maximum(s.amax(-1), s0)
        e, e0 = torch.exp(s - m[..., None]), torch.exp(s0 - m)
        den = e.sum(-1) + e0
        out["p"], out["p0"] = e / den[..., None], e0 / den
    else:
        out["p"] = torch.softmax(s, dim=-1)
    zero = torch.zeros((), dtype=torch.float32, device=q.device)
    if decoupled:
        ds = cfg.sem_head_dim
        s_sem = torch.matmul(q[..., :ds], k[..., :ds].transpose(-1, -2))[:, sel]
        s_geo = torch.matmul(q[..., ds:], k[..., ds:].transpose(-1, -2))[:, sel]
        out["s_sem"], out["s_geo"] = torch.where(mask, s_sem, zero), torch.where(mask, s_geo, zero)
    else:
        out["s"] = torch.where(mask, s, zero)
    return out


def _q_weights(attn, decoupled: bool) -> list[torch.Tensor]:
    return [getattr(attn, n).weight for n in (("q_sem", "q_geo") if decoupled else ("q_proj",))]


@torch.no_grad()
def analyse(model, idx_BT: torch.Tensor, spec: AnalysisSpec) -> dict[str, torch.Tensor]:
    """Per-(layer, head) metrics (Ls, Hs) plus the maps to store, as tensors on the model's
    device (train/analysis.analyse's keys and shapes). Runs the blocks as they are: put the
    model in eval mode for a pass without dropout (`Analyzer` does)."""
    cfg = model.cfg
    decoupled = cfg.attn_mode == "decoupled"
    idx_BT = model.as_tokens(idx_BT)
    positions = torch.arange(idx_BT.shape[1], device=idx_BT.device)
    heads = list(spec.heads)
    x = model.embed(idx_BT)
    per: dict[str, list] = {}

    def keep(k, v):
        per.setdefault(k, []).append(v)

    for li, block in enumerate(model.blocks):
        if li in spec.layers:
            maps = _layer_maps(block.attn, block.ln1(x), heads, decoupled)
            p, p0 = maps["p"], maps.get("p0")
            keep("attn_entropy", row_entropy(p, p0).mean(dim=(0, 2)))
            keep("attn_topk_mass", topk_mass(p, spec.topk).mean(dim=(0, 2)))
            keep("attn_local_mass", local_mass(p, spec.local_window).mean(dim=(0, 2)))
            if p0 is not None:
                keep("attn_null_mass", p0.mean(dim=(0, 2)))
            if decoupled:
                e_sem = maps["s_sem"].square().sum(dim=(0, 2, 3))
                e_geo = maps["s_geo"].square().sum(dim=(0, 2, 3))
                tot = torch.clamp(e_sem + e_geo, min=1e-30)
                keep("sem_energy_ratio", e_sem / tot)
                keep("geo_energy_ratio", e_geo / tot)
            keep("attn", p[0])
            if p0 is not None:
                keep("attn_null", p0[0])
            if spec.ranks:
                sv = _svdvals(p[0])  # (Hs, T)
                keep("svals", sv)
                keep("attn_erank", effective_rank(sv))
                keep("proj_stable_rank", torch.stack([stable_rank(w) for w in _q_weights(block.attn, decoupled)]))
            if spec.save_scores:
                for name in ("s_sem", "s_geo", "s"):
                    if name in maps:
                        keep("scores" + name[1:], maps[name][0])
        if li < max(spec.layers):  # later layers are not needed
            x, _ = block(x, positions)
    return {k: torch.stack(v) for k, v in per.items()}


class Analyzer:
    """The analysis of the current weights on a fixed validation sequence: the torch
    counterpart of train/analysis.Analyzer, with the same call and results."""

    def __init__(self, spec: AnalysisSpec, model: Any = None):
        """`model`: the torch_ref DBAModel to analyse when a call does not pass one (optional)."""
        self.spec, self.model = spec, model

    def __call__(self, model, idx_BT) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """`model`: a torch_ref DBAModel, or anything holding one as `.model` (a TorchStepper),
        or anything else (e.g. JAX-style params) to analyse the model given at construction;
        `idx_BT`: the (1, T) token ids (numpy or tensor). Returns (the event's scalar means and
        per-layer lists, the float32 numpy arrays for analysis.h5). The model's train/eval mode
        is restored afterwards."""
        model = getattr(model, "model", model)
        if not isinstance(model, torch.nn.Module):
            if self.model is None:
                raise TypeError("Analyzer: pass a torch_ref DBAModel (none was given at construction)")
            model = self.model
        was_training = model.training
        model.eval()
        try:
            arrays = analyse(model, idx_BT, self.spec)
        finally:
            model.train(was_training)
        return summarise({k: v.float().cpu().numpy() for k, v in arrays.items()}, self.spec.level)
