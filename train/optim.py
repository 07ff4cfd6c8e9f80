"""Optimizer chain for JAX training, built from optax pieces and the framework-free definition
in dba/optimizers.py (the schedule formula and the weight-decay rule, shared with the torch
optimizers of torch_ref/optim.py).

clip_by_global_norm -> inject_hyperparams(optimizer)(learning_rate=schedule), so the learning
rate actually used is readable from the state (`current_lr`) for logging.

Weight decay follows v29 (SPEC §7): decoupled and scaled by the learning rate,
    p_new = p * (1 - lr*wd) - lr * update,
which is what optax's `add_decayed_weights` followed by `scale_by_learning_rate` computes:
p - lr * (update + wd * p). The decay uses p from before the update in both forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dba.optimizers import decays
from train.config import OptimConfig


def lion_v29(b1: float = 0.9, b2: float = 0.99) -> optax.GradientTransformation:
    """Lion as v29 implements it: the sign direction, unscaled (lr and decay come later in the chain).

    v29 overwrites its momentum buffer with c before the second EMA, so the new momentum is
    b2*c + (1-b2)*g rather than the paper's b2*m + (1-b2)*g. The state is optax's
    ScaleByLionState so checkpoints look the same as for `optax.lion`.
    """

    def init_fn(params):
        mu = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(updates, state, params=None):
        del params
        c = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, updates, state.mu)
        direction = jax.tree.map(jnp.sign, c)  # sign(0) = 0, as torch.sign in v29
        mu = jax.tree.map(lambda ci, g: (b2 * ci + (1.0 - b2) * g).astype(ci.dtype), c, updates)
        count = optax.safe_increment(state.count)
        return direction, optax.ScaleByLionState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def decay_mask(params, exempt_1d: bool = True):
    """True where weight decay applies (dba.optimizers.decays on each leaf's path and ndim). Works
    on any pytree, nnx.State included."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: decays(jax.tree_util.keystr(path), jnp.ndim(x), exempt_1d), params)


def build_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The training chain for the --optimizer group `o` over a run of `total_steps`:
    clip_by_global_norm -> inject_hyperparams(lion | lion_v29 | adamw)(learning_rate=the run's
    LRSchedule). `lion` is the paper's update (optax.lion), `lion_v29` the seed run's."""
    schedule = o.schedule(int(total_steps))
    b1, b2 = o.betas
    wd = float(o.weight_decay)
    mask = (lambda params: decay_mask(params, True)) if o.wd_exempt_1d else None  # v29 decays every parameter

    def factory(learning_rate):
        if o.name == "lion":
            return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=wd, mask=mask)
        if o.name == "lion_v29":
            return optax.chain(
                lion_v29(b1, b2),
                optax.add_decayed_weights(wd, mask),
                optax.scale_by_learning_rate(learning_rate),
            )
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=float(o.adam_eps), weight_decay=wd, mask=mask)

    # The learning rate stays fp32 with bf16 parameters (optax would store it in the parameter
    # dtype: 3e-4 -> 2.995e-4); the update is formed in fp32 and rounded once, as torch does.
    opt = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
        learning_rate=lambda count: schedule.at(jnp.asarray(count, jnp.float32), jnp))
    if float(o.grad_clip) > 0:
        return optax.chain(optax.clip_by_global_norm(float(o.grad_clip)), opt)
    return opt


def _find_hparams(state):
    # InjectHyperparamsState, or InjectStatefulHyperparamsState when the lr is a schedule.
    hp = getattr(state, "hyperparams", None)
    if isinstance(hp, dict):
        return hp
    if isinstance(state, (tuple, list)):  # chain states (and namedtuple states) are tuples
        for s in state:
            found = _find_hparams(s)
            if found is not None:
                return found
    return None


def current_lr(opt_state) -> float:
    """The injected learning rate: after an update, the lr that update used (schedule at the
    step count before it); before any update, schedule(0)."""
    hp = _find_hparams(opt_state)
    if hp is None or "learning_rate" not in hp:
        raise ValueError("optimizer state has no injected learning_rate (not built by build_optimizer?)")
    lr = hp["learning_rate"]
    return float(getattr(lr, "value", lr))  # nnx.Optimizer wraps state arrays in OptArray
