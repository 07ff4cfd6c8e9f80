"""Reading v29 checkpoints without any framework: payload -> (config, canonical state, info)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dba.config import ConfigError, ModelConfig
from dba.errors import UserError
from dba.weights import validate_state


def read_v29_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    from dba.torchfile import read_pt

    path = Path(path)
    payload = read_pt(path)
    if not isinstance(payload, dict) or "config" not in payload or "model" not in payload:
        raise UserError(f"{str(path)!r} is not a v29 checkpoint (expected a dict with 'config' and 'model')", 1)
    try:
        cfg = ModelConfig.from_dict(dict(payload["config"]), v29=True)
    except (ConfigError, TypeError) as e:
        raise UserError(f"{str(path)}: bad model config: {e}", 1) from None
    model_sd = payload["model"]
    if not isinstance(model_sd, dict) or not all(isinstance(v, np.ndarray) for v in model_sd.values()):
        raise UserError(f"{str(path)!r}: 'model' is not a state dict of tensors", 1)
    state = {k: np.asarray(v, dtype=np.float32) for k, v in model_sd.items()}
    validate_state(cfg, state, str(path))
    info = {"source": str(path), "format": "v29", "step": payload.get("step"), "best_val": payload.get("best_val")}
    return cfg, state, info
