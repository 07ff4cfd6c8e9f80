"""The initial weights the JAX trainer draws for a seed, as canonical numpy arrays: what a
PyTorch run (torch_train/backend.py) starts from, so the two frameworks train the same model from the
same `--seed`. JAX runs on the CPU here, leaving the GPU to torch."""

from __future__ import annotations

import os
import sys
from typing import Any


def initial_state(cfg, seed: int) -> tuple[dict[str, Any] | None, str]:
    """(canonical numpy weights the JAX trainer draws for `seed`, or None without JAX; a note)."""
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process trains with torch: keep JAX off the GPU
    try:
        from flax import nnx

        from jax_model import DBAModel
        from jax_model.weights_io import canonical_state
    except ImportError:
        return None, "JAX is not installed: torch's initialisers drew the weights (same distributions)"
    return canonical_state(DBAModel(cfg, rngs=nnx.Rngs(seed))), "weights drawn as the JAX trainer draws them"
