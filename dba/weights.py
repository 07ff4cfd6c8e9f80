"""Canonical weights: v29 state-dict names with torch layouts (Linear weights are [out, in]).

Both frameworks convert to and from this flat `{name: np.ndarray}` form, and the safetensors
export stores it as is. `tie_qk` checkpoints list both the Q and the K name (v29's state dict does,
one tensor under two names); `tied_aliases` names the K keys that merely repeat a Q key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from dba.config import ConfigError, ModelConfig
from dba.errors import UserError

CONFIG_METADATA_KEY = "dba_config"


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


_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64", "F16", "BF16", "F32", "F64"}


def validate_layout(cfg: ModelConfig, layout: Mapping[str, tuple[tuple[int, ...], str]],
                    source: str = "checkpoint") -> None:
    """Names, shapes and dtypes ({name: (shape, dtype name)}) against the config; runs on a
    file's header, before any tensor data is read."""
    want = param_shapes(cfg)
    missing = [k for k in want if k not in layout]
    extra = [k for k in layout if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[0]!r}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s) e.g. {extra[0]!r}")
        raise UserError(f"{source} does not match the config ({cfg.attn_mode}): " + "; ".join(parts), 1)
    for k, shape in want.items():
        got, dtype = layout[k]
        if tuple(got) != shape:
            raise UserError(f"{source}: tensor {k!r} has shape {tuple(got)}, config expects {shape}", 1)
        if str(dtype) not in _FLOAT_DTYPES:
            raise UserError(f"{source}: tensor {k!r} has dtype {dtype}, expected a float type", 1)


def validate_state(cfg: ModelConfig, state: Mapping[str, np.ndarray], source: str = "checkpoint") -> None:
    """Check names, shapes, dtypes and ties against the config before any tensor is used."""
    validate_layout(cfg, {k: (tuple(a.shape), str(np.asarray(a).dtype) if not hasattr(a, "dtype") else str(a.dtype))
                          for k, a in state.items()}, source)
    for k, q in tied_aliases(cfg).items():
        if not np.array_equal(np.asarray(state[k]), np.asarray(state[q])):
            raise UserError(f"{source}: tie_qk is set but {k!r} differs from {q!r}", 1)


def save_safetensors(path: str | Path, cfg: ModelConfig, state: Mapping[str, np.ndarray],
                     extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write a project export: canonical tensors + the config JSON in the file's metadata.

    Written to a temporary name and renamed, so an interrupted save never leaves half a file.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    validate_state(cfg, state, str(path))
    meta = {CONFIG_METADATA_KEY: cfg.to_json(), "format": "dba-canonical-v1"}
    meta.update(extra_metadata or {})
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_safetensors(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, str]]:
    """Read a project export; the config comes from the metadata or a sibling config.json."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            cfg = _export_config(path, meta)
            # the header is checked against the config before any tensor's bytes are read
            layout = {}
            for k in f.keys():
                sl = f.get_slice(k)
                layout[k] = (tuple(sl.get_shape()), sl.get_dtype())
            validate_layout(cfg, layout, str(path))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read safetensors file {str(path)!r}: {first}", 1) from None
    validate_state(cfg, state, str(path))
    return cfg, state, meta


def _export_config(path: Path, meta: Mapping[str, str]) -> ModelConfig:
    cfg_json = meta.get(CONFIG_METADATA_KEY)
    if cfg_json is None:
        side = path.with_name("config.json")
        if not side.exists():
            raise UserError(f"{str(path)!r} carries no config (no metadata and no config.json beside it)", 1)
        cfg_json = side.read_text()
    try:
        return ModelConfig.from_json(cfg_json)
    except ConfigError as e:
        raise UserError(f"{str(path)!r}: bad config: {e}", 1) from None


def count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def config_to_json_file(cfg: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
