"""v29 checkpoints: the payload check and its conversion to (config, canonical state, info),
shared by the framework-free reader (dba.torchfile) and the torch reference (torch.load with
weights_only=True), which only differ in how they unpickle the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from dba.config import ConfigError, ModelConfig
from dba.errors import UserError
from dba.weights import validate_state


def from_payload(payload: Any, source: str) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """`torch.save({"config": ..., "model": state_dict, "step": ..., "best_val": ...})` as read,
    with the state dict's tensors as numpy arrays -> (config, fp32 state, info); one-line
    UserErrors (exit 1) for anything else."""
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise UserError(f"{source!r} is not a v29 checkpoint (expected a dict with 'config' and 'model')", 1)
    try:
        cfg = ModelConfig.from_dict(dict(payload["config"]), v29=True)
    except (ConfigError, TypeError) as e:
        raise UserError(f"{source}: bad model config: {e}", 1) from None
    model_sd = payload["model"]
    if not isinstance(model_sd, dict) or not all(isinstance(v, np.ndarray) for v in model_sd.values()):
        raise UserError(f"{source!r}: 'model' is not a state dict of tensors", 1)
    state = {k: np.asarray(v, dtype=np.float32) for k, v in model_sd.items()}
    validate_state(cfg, state, source)
    info = {"source": source, "format": "v29", "step": payload.get("step"), "best_val": payload.get("best_val")}
    return cfg, state, info


def read_v29_checkpoint(path: str | Path, load_payload: Callable[[Path], Any] | None = None):
    """(config, canonical state, info) of a v29 best.pt/last.pt. `load_payload` unpickles the file
    (default: dba.torchfile's weights-only reader, no torch needed)."""
    if load_payload is None:
        from dba.torchfile import read_pt as load_payload
    path = Path(path)
    return from_payload(load_payload(path), str(path))


# v29's ModelConfig fields (SPEC §1): what a v29 payload's `config` holds and v29 can load.
V29_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff", "kv_head", "embed_dim", "attn_mode",
              "attn_dim", "sem_dim", "geo_dim", "rope", "rope_base", "tie_qk", "null_attn", "learned_temp", "mlp",
              "dropout")


def v29_config_dict(cfg: ModelConfig, dest: str) -> dict[str, Any]:
    """The `config` dict of a v29 payload for `cfg`. v29's ModelConfig has no decoupled_scale: its
    scaling is implied by attn_mode/null_attn, so a model whose scaling v29 would not imply cannot
    be written for v29 (a one-line UserError naming `dest`)."""
    ours = {k: v for k, v in cfg.to_dict().items() if k not in V29_FIELDS}
    defaults = ModelConfig().to_dict()
    beyond = [f"{k}={v!r}" if len(repr(v)) <= 40 else k  # a recorded frequency table is named, not shown
              for k, v in ours.items() if k != "decoupled_scale" and v != defaults[k]]
    if beyond:
        raise UserError(f"cannot write {dest!r} for v29: v29's model has no {', '.join(beyond)} "
                        f"(options beyond v29's model); keep the safetensors export", 1)
    config = {k: v for k, v in cfg.to_dict().items() if k in V29_FIELDS}
    implied = ModelConfig.from_dict(config, v29=True)
    if implied.decoupled_scale != cfg.decoupled_scale:
        raise UserError(f"cannot write {dest!r} for v29: the model uses decoupled_scale="
                        f"{cfg.decoupled_scale!r}, which v29 cannot express without null_attn "
                        f"(it would load as {implied.decoupled_scale!r}); keep the safetensors export", 1)
    return config
