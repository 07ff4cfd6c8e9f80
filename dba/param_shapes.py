"""Every canonical parameter of a model and its shape, from the config alone (v29's state-dict
names, torch layouts: Linear weights are [out, in]); and the K names that are the Q tensor under
`tie_qk`. Used by the weight checks (dba/weights.py), both frameworks' weight I/O and
`ModelConfig.num_params`; it needs nothing but the config's fields, so dba/config.py can count
parameters without importing dba/weights.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dba.config import ModelConfig


def attn_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Attention parameters of one block, names relative to `blocks.{i}.attn.`."""
    d, h = cfg.d_model, cfg.n_head
    out: dict[str, tuple[int, ...]] = {}
    if cfg.attn_mode == "decoupled":
        out["q_sem.weight"] = (cfg.sem_dim, d)
        out["k_sem.weight"] = (cfg.sem_dim, d)
        out["q_geo.weight"] = (cfg.geo_dim, d)
        out["k_geo.weight"] = (cfg.geo_dim, d)
        out["v_proj.weight"] = (cfg.attn_dim, d)
    else:
        kv = cfg.kv_streams()
        out["q_proj.weight"] = (cfg.qk_dim, d)
        out["k_proj.weight"] = (kv["k"], d)
        out["v_proj.weight"] = (kv["v"], d)
    out["out_proj.weight"] = (d, cfg.v_dim)
    if cfg.learned_temp:
        out["logit_scale"] = (h,)
    if cfg.null_attn:
        if cfg.attn_mode == "decoupled":
            out["k_sem_null"] = (1, 1, cfg.sem_dim)
            out["k_geo_null"] = (1, 1, cfg.geo_dim)
            out["v_null"] = (1, 1, cfg.attn_dim)
        else:
            kv = cfg.kv_streams()
            out["k_null"] = (1, 1, kv["k"])
            out["v_null"] = (1, 1, kv["v"])
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name -> shape, in v29 state-dict order."""
    out: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg.vocab_size, cfg.embed_dim)}
    if cfg.embed_dim != cfg.d_model:
        out["emb_in.weight"] = (cfg.d_model, cfg.embed_dim)
        out["emb_out.weight"] = (cfg.embed_dim, cfg.d_model)
    attn = attn_param_shapes(cfg)
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        out[p + "ln1.weight"] = (cfg.d_model,)
        out[p + "ln1.bias"] = (cfg.d_model,)
        for k, s in attn.items():
            out[p + "attn." + k] = s
        out[p + "ln2.weight"] = (cfg.d_model,)
        out[p + "ln2.bias"] = (cfg.d_model,)
        out[p + "ff.w1.weight"] = (cfg.d_ff, cfg.d_model)
        if cfg.mlp == "swiglu":
            out[p + "ff.w2.weight"] = (cfg.d_ff, cfg.d_model)
            out[p + "ff.w3.weight"] = (cfg.d_model, cfg.d_ff)
        else:
            out[p + "ff.w2.weight"] = (cfg.d_model, cfg.d_ff)
    out["ln_f.weight"] = (cfg.d_model,)
    out["ln_f.bias"] = (cfg.d_model,)
    return out


def tied_aliases(cfg: ModelConfig) -> dict[str, str]:
    """K names that are the same tensor as a Q name under tie_qk: {k_name: q_name}."""
    if not cfg.tie_qk:
        return {}
    pairs = [("k_sem", "q_sem"), ("k_geo", "q_geo")] if cfg.attn_mode == "decoupled" else [("k_proj", "q_proj")]
    return {
        f"blocks.{i}.attn.{k}.weight": f"blocks.{i}.attn.{q}.weight"
        for i in range(cfg.n_layer)
        for k, q in pairs
    }
