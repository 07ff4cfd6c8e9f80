"""Loading and saving torch_ref weights: v29 `.pt` payloads, safetensors exports, run directories.

`.pt` files are only ever read with `weights_only=True`: a checkpoint someone sent you cannot
run code. Mirrors jax_model/weights_io.py.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dba.config import ModelConfig
from dba.errors import UserError
from dba.v29 import v29_config_dict
from dba.weight_files import read_weights
from dba.weights import save_safetensors, tied_aliases, validate_state
from torch_ref.devices import default_device
from torch_ref.model import DBAModel


def read_v29_payload(path: str | Path) -> Any:
    """A `.pt` file as torch.load(weights_only=True) reads it, without executing any pickled code,
    with the state dict's tensors as numpy arrays (for dba.v29.from_payload's checks)."""
    path = Path(path)
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {str(path)!r}", 1) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {str(path)!r} as a weights-only checkpoint: {first}", 1) from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = {**payload, "model": {k: to_numpy(v) if isinstance(v, torch.Tensor) else v
                                        for k, v in payload["model"].items()}}
    return payload


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bf16; fp32 holds it exactly
        t = t.float()
    return t.numpy()


def canonical_state(model: DBAModel) -> dict[str, np.ndarray]:
    """The model's weights under canonical (v29) names as numpy arrays, both tie_qk names included."""
    return {k: to_numpy(v).copy() for k, v in model.state_dict().items()}


def load_canonical(model: DBAModel, state: dict[str, np.ndarray], source: str = "weights") -> DBAModel:
    validate_state(model.cfg, state, source)
    ref = model.state_dict()
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(ref[k].dtype) for k, v in state.items()}
    model.load_state_dict(tensors, strict=True)
    return model


def load_with_config(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """(config, canonical numpy state, info) from a v29 .pt (read by torch, weights only), a
    .safetensors export or a run dir."""
    return read_weights(path, load_payload=read_v29_payload)


def load(path: str | Path, device: str | torch.device | None = None,
         dtype: torch.dtype = torch.float32) -> DBAModel:
    """A ready model (eval mode) from a v29 best.pt/last.pt, a project export, or a run directory."""
    cfg, state, info = load_with_config(path)
    model = DBAModel(cfg)
    load_canonical(model, state, info["source"])
    dev = torch.device(device) if device is not None else default_device()
    model = model.to(device=dev, dtype=dtype).eval()
    model.load_info = info
    return model


def save_export(path: str | Path, model: DBAModel, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the framework-neutral safetensors export (config in the metadata)."""
    return save_safetensors(path, model.cfg, canonical_state(model), extra_metadata)


def save_v29(path: str | Path, cfg: ModelConfig, state: dict[str, np.ndarray], step: int = 0,
             best_val: float = math.nan) -> Path:
    """Write a checkpoint v29 can load: its payload layout, tie_qk keys sharing one tensor."""
    validate_state(cfg, state, str(path))
    config = v29_config_dict(cfg, str(path))
    tensors: dict[str, torch.Tensor] = {}
    aliases = tied_aliases(cfg)
    for k, v in state.items():
        if k not in aliases:
            tensors[k] = torch.from_numpy(np.array(v))
    for k, q in aliases.items():
        tensors[k] = tensors[q]
    payload = {"config": config, "model": {k: tensors[k] for k in state}, "step": int(step), "best_val": float(best_val)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, str(tmp))
    tmp.replace(path)
    return path
