"""Hugging Face `config.json` <-> ModelConfig for the Llama family (framework-free): Llama,
Mistral and Qwen2 (SPEC §8). What a config says that dba cannot compute is refused by name.

The model is dba's `gqa` mode: q_proj d_model -> n_head * head_dim, k/v_proj -> n_kv * head_dim,
head_dim = attn_dim / n_head (scale 1/sqrt(head_dim)), RMSNorm, SwiGLU (gate = w1, up = w2,
down = w3), RoPE on the whole head with the half-split layout (the same as dba's), no learned
temperature, no null key. Qwen2 has biases on q/k/v; Llama's `attention_bias` puts them on
q/k/v/o and `mlp_bias` on the MLP. Mistral's (and Qwen2's) sliding window changes attention only
past the window, so the context is capped at the window and the model is a Llama within it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dba.config import ConfigError, ModelConfig
from dba.errors import UserError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def read_config_json(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise UserError(f"{str(hf_dir)!r} is not a directory (a Hugging Face model directory holds config.json "
                        f"and model.safetensors)", 1)
    if not path.is_file():
        raise UserError(f"{str(hf_dir)!r} has no config.json: not a Hugging Face model directory", 1)
    try:
        hf = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{str(path)!r} is not readable JSON: {e}", 1) from None
    if not isinstance(hf, dict):
        raise UserError(f"{str(path)!r} is not a JSON object", 1)
    return hf


def architecture(hf: dict[str, Any], where: str) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        named = arch or f"model_type {hf.get('model_type')!r} (no architectures entry)"
        raise UserError(f"{where}: {named} is not supported; dba converts {', '.join(ARCHITECTURES)}", 1)
    return arch


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """RoPE theta and scaling from either spelling: transformers 5's `rope_parameters` or the
    hub's (and 4.x's) top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    src = params if params.get("rope_type", "default") != "default" else scaling
    if float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UserError(f"{where}: partial_rotary_factor {hf.get('partial_rotary_factor')} is not supported "
                        f"(dba rotates the whole head)", 1)
    out: dict[str, Any] = {"rope_base": float(theta)}
    if kind == "default":
        return out
    if kind != "llama3":
        raise UserError(f"{where}: rope scaling {kind!r} is not supported (dba implements default and llama3)", 1)
    try:
        out.update(rope_type="llama3", rope_factor=float(src["factor"]),
                   rope_low_freq_factor=float(src["low_freq_factor"]),
                   rope_high_freq_factor=float(src["high_freq_factor"]),
                   rope_original_context=int(src["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: llama3 rope scaling without {e}", 1) from None
    if float(src.get("attention_factor", 1.0) or 1.0) != 1.0:
        raise UserError(f"{where}: llama3 rope with attention_factor {src['attention_factor']} is not supported", 1)
    return out


def model_config(hf: dict[str, Any], where: str) -> tuple[ModelConfig, str, list[str]]:
    """(ModelConfig, family, notes) of a Llama/Mistral/Qwen2 config.json."""
    arch = architecture(hf, where)
    family = _FAMILY[arch]
    notes: list[str] = []
    try:
        d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        kv = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or d // heads)
        fields = dict(vocab_size=int(hf["vocab_size"]), n_layer=int(hf["num_hidden_layers"]), n_head=heads,
                      d_model=d, embed_dim=d, d_ff=int(hf["intermediate_size"]), attn_mode="gqa",
                      attn_dim=heads * head_dim, kv_head=kv, rope=True, tie_qk=False, null_attn=False,
                      learned_temp=False, mlp="swiglu", dropout=0.0, norm="rmsnorm",
                      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      block_size=int(hf.get("max_position_embeddings", 2048)))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: config.json lacks a usable {e}", 1) from None
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)", 1)
    if family == "qwen2":
        fields.update(qkv_bias=True, out_bias=False, mlp_bias=False)
    else:
        bias = bool(hf.get("attention_bias", False))
        fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    fields.update(_rope(hf, where))
    window = hf.get("sliding_window")
    sliding = family == "mistral" or "sliding_attention" in (hf.get("layer_types") or []) or (
        family == "qwen2" and hf.get("use_sliding_window"))
    if sliding and window and int(window) < fields["block_size"]:
        notes.append(f"sliding window {int(window)}: the context is capped there (within it the model is a Llama)")
        fields["block_size"] = int(window)
    try:
        return ModelConfig(**fields), family, notes
    except ConfigError as e:
        raise UserError(f"{where}: {e}", 1) from None


# ---- weight names -------------------------------------------------------------------------------

_LAYER = {  # per-layer Hugging Face name -> dba canonical name (relative to the layer)
    "input_layernorm.weight": "ln1.weight", "post_attention_layernorm.weight": "ln2.weight",
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.out_proj", "mlp.gate_proj": "ff.w1", "mlp.up_proj": "ff.w2",
    "mlp.down_proj": "ff.w3",
}


def hf_to_canonical(name: str) -> str | None:
    """The dba name of a Llama-family tensor; None for tensors that carry nothing dba needs (a
    cached `rotary_emb.inv_freq` buffer). Unknown names are returned as they are (the layout
    check then names them)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "model.embed_tokens.weight":
        return "tok_emb.weight"
    if name == "model.norm.weight":
        return "ln_f.weight"
    if name == "lm_head.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        rest = ".".join(parts[3:])
        for hf_key, ours in _LAYER.items():
            if rest == hf_key or rest.startswith(hf_key + "."):
                return f"blocks.{parts[2]}.{ours}{rest[len(hf_key):]}"
    return name


def canonical_to_hf(name: str) -> str:
    """The inverse of `hf_to_canonical` (the export's names)."""
    if name == "tok_emb.weight":
        return "model.embed_tokens.weight"
    if name == "ln_f.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    parts = name.split(".")
    rest = ".".join(parts[2:])
    for hf_key, ours in _LAYER.items():
        if rest == ours or rest.startswith(ours + "."):
            return f"model.layers.{parts[1]}.{hf_key}{rest[len(ours):]}"
    raise ValueError(f"no Hugging Face name for {name!r}")
