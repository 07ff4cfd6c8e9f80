"""Canonical weights <-> NNX state, and loading from v29 `.pt`, safetensors exports and run dirs.

Canonical names are v29's state-dict names with torch layouts; NNX Linear kernels are [in, out],
so Linear weights are transposed on the way in and out. `.pt` files are read by dba.torchfile,
a weights-only reader that needs no torch. Mirrors torch_ref/weights_io.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba.weight_files import read_weights
from dba.weights import param_shapes, save_safetensors, tied_aliases, validate_state
from jax_model.model import DBAModel


def _variable(model: DBAModel, name: str) -> tuple[nnx.Variable, bool]:
    """The NNX variable behind a canonical name, and whether its layout is transposed."""
    *path, leaf = name.split(".")
    mod: Any = model
    for part in path:
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    if leaf != "weight":
        return getattr(mod, leaf), False
    if isinstance(mod, nnx.Linear):
        return mod.kernel, True
    if isinstance(mod, (nnx.LayerNorm, nnx.RMSNorm)):
        return mod.scale, False
    if isinstance(mod, nnx.Embed):
        return mod.embedding, False
    raise KeyError(name)


def canonical_state(model: DBAModel) -> dict[str, np.ndarray]:
    """Weights under canonical names as fp32 numpy arrays (tie_qk K names repeat the Q tensor)."""
    cfg = model.cfg
    aliases = tied_aliases(cfg)
    out: dict[str, np.ndarray] = {}
    for name in param_shapes(cfg):
        var, transposed = _variable(model, aliases.get(name, name))
        arr = np.asarray(jnp.asarray(var[...], jnp.float32))
        out[name] = np.ascontiguousarray(arr.T if transposed else arr)
    return out


def load_canonical(model: DBAModel, state: dict[str, np.ndarray], source: str = "weights") -> DBAModel:
    cfg = model.cfg
    validate_state(cfg, state, source)
    aliases = tied_aliases(cfg)
    for name in param_shapes(cfg):
        if name in aliases:
            continue  # the Q weight already set it
        var, transposed = _variable(model, name)
        arr = np.asarray(state[name], dtype=np.float32)
        var[...] = jnp.asarray(arr.T if transposed else arr, dtype=var[...].dtype)
    return model


def load(path: str | Path, dtype=jnp.float32, param_dtype=jnp.float32) -> DBAModel:
    """A ready model from a v29 best.pt/last.pt, a project export, or a run directory."""
    cfg, state, info = read_weights(path)
    model = DBAModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    return load_canonical(model, state, info["source"])


def save_export(path: str | Path, model: DBAModel, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the framework-neutral safetensors export (config in the metadata)."""
    return save_safetensors(path, model.cfg, canonical_state(model), extra_metadata)
