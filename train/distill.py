"""Distillation terms of the JAX train step (`dba train --distill-from TEACHER`).

The teacher is a frozen DBAModel whose parameters are an argument of the jitted step (sharded by
the same rules as the student's, never donated, never differentiated), so it runs inside the
step: no second process, no host round trip. Two phases, chosen on the host by the step number
(so a resumed run is in the same phase at the same step):

- blockwise (`--distill-blockwise N`, the first N steps): each student layer's attention, given
  the teacher's own residual stream at that layer, is trained to reproduce the teacher's attention
  output: mean over layers of |a_s - a_t|^2 / |a_t|^2. Only attention (and its ln1) is updated:
  the other updates are masked, so weight decay does not touch the copied MLPs and embeddings.
- main: `kl` = temp^2 KL(teacher || student) of the temperature-softened next-token
  distributions (Hinton et al.'s scaling keeps its gradient's size independent of temp); `ce` =
  the data's cross-entropy alone (the teacher is only measured: the baseline on the same
  pipeline); `kl+ce` = alpha KL + (1 - alpha) CE (DistillConfig.objective, shared with torch).
Every step records `distill_kl` and `distill_ce` (main) or `distill_block_mse` (blockwise).
Mirrors torch_train/distill.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jax_model.loss import cross_entropy

PHASES = ("main", "blockwise")


def kd_terms(student_BTV: jax.Array, teacher_BTV: jax.Array, targets_BT: jax.Array,
             temp: float) -> tuple[jax.Array, jax.Array]:
    """(temp^2 KL(teacher || student) at temperature temp, the data's cross-entropy), fp32 means
    over positions."""
    ls = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / temp, axis=-1)
    lt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_BTV).astype(jnp.float32) / temp, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)) * (temp * temp)
    return kl, cross_entropy(student_BTV, targets_BT)


def attention_io(model: Any, idx_BT: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """Per layer (the residual stream entering it, its attention's output), the full forward's
    own values (fp32 residual, the attention output in the compute dtype)."""
    positions = jnp.arange(idx_BT.shape[1])
    x = model.embed(idx_BT)
    out = []
    for block in model.blocks:
        a, _ = block.attn(block.ln1(x), positions)
        out.append((x, a))
        x = x + a.astype(jnp.float32)
        x = x + block.ff(block.ln2(x)).astype(jnp.float32)
    return out


def blockwise_mse(student: Any, teacher_io: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """Mean over layers of |a_s - a_t|^2 / |a_t|^2, each student layer fed the teacher's residual."""
    terms = []
    for block, (x, a_t) in zip(student.blocks, teacher_io):
        x, a_t = jax.lax.stop_gradient(x), jax.lax.stop_gradient(a_t).astype(jnp.float32)
        a_s, _ = block.attn(block.ln1(x), jnp.arange(x.shape[1]))
        err = jnp.mean(jnp.square(a_s.astype(jnp.float32) - a_t))
        terms.append(err / (jnp.mean(jnp.square(a_t)) + 1e-12))
    return jnp.mean(jnp.stack(terms))


def blockwise_mask(params: Any) -> Any:
    """1 for the parameters the blockwise phase trains (each block's attention and ln1), else 0."""
    def keep(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return jnp.float32(1.0 if ("attn" in names or "ln1" in names) else 0.0)

    return jax.tree_util.tree_map_with_path(keep, params)


def check_teacher(student_cfg: Any, teacher_cfg: Any, blockwise: int, source: str) -> None:
    """The pairs distillation cannot use: one line naming both sides."""
    from dba.errors import UserError

    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise UserError(f"--distill-from {source!r}: the teacher's vocabulary is {teacher_cfg.vocab_size} ids, the "
                        f"student's {student_cfg.vocab_size}: they must match", 2)
    if blockwise and (teacher_cfg.n_layer, teacher_cfg.d_model) != (student_cfg.n_layer, student_cfg.d_model):
        raise UserError(f"--distill-blockwise needs a teacher of the student's depth and width: teacher "
                        f"{teacher_cfg.n_layer} layers x {teacher_cfg.d_model}, student {student_cfg.n_layer} x "
                        f"{student_cfg.d_model} (an upcycled student has its teacher's)", 2)
