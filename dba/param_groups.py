"""The gradient-norm groups of the train log, by parameter name (framework-free: the JAX step
(train/grad_norms.py) and the torch step (torch_train/step.py) both use this rule).

Names are the canonical ones of dba/weights.py split into parts (`blocks.0.attn.q_sem.weight`, or
the NNX path of the same parameter):
- `embed`: the token embedding (tied to the output, or the untied `lm_head`) and the lexical bottleneck `emb_in`/`emb_out`;
- `attn`: everything under a block's `attn` (projections, temperature, null key/value);
- `ffn`: everything under a block's `ff`;
- `attn_sem` / `attn_geo` (decoupled only): the semantic and geometric Q/K projections and null
  keys, the two score paths whose balance the analysis pass measures.
LayerNorms belong to no group (they are in `grad_norm_total`). A tied K has no parameter of its
own: its gradient is already summed into the Q projection's, so `q_sem` carries both.
"""

from __future__ import annotations

_SEM = ("q_sem", "k_sem", "k_sem_null")
_GEO = ("q_geo", "k_geo", "k_geo_null")


def param_groups(names: list[str], decoupled: bool) -> list[str]:
    """The groups one parameter (given its name's parts) belongs to."""
    groups = []
    if names and names[0] in ("tok_emb", "emb_in", "emb_out", "lm_head"):
        groups.append("embed")
    if "attn" in names:
        groups.append("attn")
        if decoupled:
            i = names.index("attn") + 1
            owner = names[i] if i < len(names) else ""
            if owner in _SEM:
                groups.append("attn_sem")
            elif owner in _GEO:
                groups.append("attn_geo")
    if "ff" in names:
        groups.append("ffn")
    return groups


def group_names(decoupled: bool) -> tuple[str, ...]:
    return ("embed", "attn", "ffn") + (("attn_sem", "attn_geo") if decoupled else ())
