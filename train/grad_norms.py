"""Gradient norms per parameter group, computed inside the jitted train step.

Groups by parameter path (the canonical names of dba/weights.py, as NNX paths):
- `embed`: the token embedding (tied to the output) and the lexical bottleneck `emb_in`/`emb_out`;
- `attn`: everything under a block's `attn` (projections, temperature, null key/value);
- `ffn`: everything under a block's `ff`;
- `attn_sem` / `attn_geo` (decoupled only): the semantic and geometric Q/K projections and null
  keys, the two score paths whose balance the analysis pass measures.
LayerNorms belong to no group (they are in `grad_norm_total`). A tied K has no parameter of its
own: its gradient is already summed into the Q projection's, so `q_sem` carries both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from train.sharding import path_names

_SEM = ("q_sem", "k_sem", "k_sem_null")
_GEO = ("q_geo", "k_geo", "k_geo_null")


def param_groups(names: list[str], decoupled: bool) -> list[str]:
    """The groups one parameter (given its path names) belongs to."""
    groups = []
    if names and names[0] in ("tok_emb", "emb_in", "emb_out"):
        groups.append("embed")
    if "attn" in names:
        groups.append("attn")
        if decoupled:
            leaf_owner = names[names.index("attn") + 1] if names.index("attn") + 1 < len(names) else ""
            if leaf_owner in _SEM:
                groups.append("attn_sem")
            elif leaf_owner in _GEO:
                groups.append("attn_geo")
    if "ff" in names:
        groups.append("ffn")
    return groups


def group_names(decoupled: bool) -> tuple[str, ...]:
    return ("embed", "attn", "ffn") + (("attn_sem", "attn_geo") if decoupled else ())


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
