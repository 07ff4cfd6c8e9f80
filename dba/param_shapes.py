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

    def linear(name: str, n_out: int, n_in: int, bias: bool) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        if bias:
            out[f"{name}.bias"] = (n_out,)

    if cfg.attn_mode == "decoupled":
        kv = cfg.kv_streams()  # the key/value widths: per kv head (decoupled_kv_head) x head dims
        for name, width in (("q_sem", cfg.sem_dim), ("k_sem", kv["k_sem"]), ("q_geo", cfg.geo_dim),
                            ("k_geo", kv["k_geo"]), ("v_proj", kv["v"])):
            linear(name, width, d, cfg.qkv_bias)
    else:
        kv = cfg.kv_streams()
        for name, width in (("q_proj", cfg.qk_dim), ("k_proj", kv["k"]), ("v_proj", kv["v"])):
            linear(name, width, d, cfg.qkv_bias)
    linear("out_proj", d, cfg.v_dim, cfg.out_bias)
    if cfg.learned_temp:
        out["logit_scale"] = (h,)
    if cfg.null_attn:
        if cfg.attn_mode == "decoupled":  # one null key/value per kv head
            kv = cfg.kv_streams()
            out["k_sem_null"] = (1, 1, kv["k_sem"])
            out["k_geo_null"] = (1, 1, kv["k_geo"])
            out["v_null"] = (1, 1, kv["v"])
        else:
            kv = cfg.kv_streams()
            out["k_null"] = (1, 1, kv["k"])
            out["v_null"] = (1, 1, kv["v"])
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name -> shape, in the torch model's state-dict order (v29's, with
    the options of SPEC §8: RMSNorm has no bias, biases follow their weights, `lm_head.weight`
    last when the head is untied)."""
    out: dict[str, tuple[int, ...]] = {"tok_emb.weight": (cfg.vocab_size, cfg.embed_dim)}
    if cfg.embed_dim != cfg.d_model:
        out["emb_in.weight"] = (cfg.d_model, cfg.embed_dim)
        out["emb_out.weight"] = (cfg.embed_dim, cfg.d_model)
    attn = attn_param_shapes(cfg)

    def norm(name: str) -> None:
        out[f"{name}.weight"] = (cfg.d_model,)
        if cfg.norm == "layernorm":
            out[f"{name}.bias"] = (cfg.d_model,)

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        if cfg.mlp_bias:
            out[f"{name}.bias"] = (n_out,)

    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        norm(p + "ln1")
        for k, s in attn.items():
            out[p + "attn." + k] = s
        norm(p + "ln2")
        linear(p + "ff.w1", cfg.d_ff, cfg.d_model)
        if cfg.mlp == "swiglu":
            linear(p + "ff.w2", cfg.d_ff, cfg.d_model)
            linear(p + "ff.w3", cfg.d_model, cfg.d_ff)
        else:
            linear(p + "ff.w2", cfg.d_model, cfg.d_ff)
    norm("ln_f")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.embed_dim)
    return out


def tied_aliases(cfg: ModelConfig) -> dict[str, str]:
    """K names that are the same tensor as a Q name under tie_qk: {k_name: q_name} (the bias too)."""
    if not cfg.tie_qk:
        return {}
    pairs = [("k_sem", "q_sem"), ("k_geo", "q_geo")] if cfg.attn_mode == "decoupled" else [("k_proj", "q_proj")]
    leaves = ("weight", "bias") if cfg.qkv_bias else ("weight",)
    return {
        f"blocks.{i}.attn.{k}.{leaf}": f"blocks.{i}.attn.{q}.{leaf}"
        for i in range(cfg.n_layer)
        for k, q in pairs
        for leaf in leaves
    }
