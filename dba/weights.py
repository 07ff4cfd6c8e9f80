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
from dba.param_shapes import attn_param_shapes, param_shapes, tied_aliases  # noqa: F401 (part of this API)

CONFIG_METADATA_KEY = "dba_config"


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
    import ml_dtypes  # noqa: F401 (registers bfloat16 with numpy: a bf16 export reads as such)
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
            # a tied K stored once, under its Q name (a Hugging Face custom-code export): the same tensor
            aliases = {k: q for k, q in tied_aliases(cfg).items() if k not in layout and q in layout}
            layout.update({k: layout[q] for k, q in aliases.items()})
            validate_layout(cfg, layout, str(path))
            state = {k: f.get_tensor(k) for k in f.keys()}
            state.update({k: state[q] for k, q in aliases.items()})
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
