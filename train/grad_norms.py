"""Gradient norms per parameter group (dba/param_groups.py), computed inside the jitted train step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dba.param_groups import group_names, param_groups
from train.sharding import path_names


def group_grad_norms(grads: Any, decoupled: bool) -> dict[str, jax.Array]:
    """{"grad_norm_<group>": fp32 scalar} for every group of `group_names(decoupled)`."""
    sq = {g: jnp.zeros((), jnp.float32) for g in group_names(decoupled)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
        s = None
        for g in param_groups(path_names(path), decoupled):
            if s is None:
                s = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
            sq[g] = sq[g] + s
    return {f"grad_norm_{g}": jnp.sqrt(v) for g, v in sq.items()}
