"""Optimizer chain for JAX training, built from optax pieces.

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

from dba.optimizers import DEFAULT_BETAS, check_optimizer, check_schedule


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


def _is_exempt(path_str: str, ndim: int) -> bool:
    return "tok_emb" in path_str or ndim <= 1


def decay_mask(params):
    """True where weight decay applies: everything but embeddings (path contains "tok_emb") and
    parameters with ndim <= 1 (norm scales, biases). Works on any pytree, nnx.State included."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: not _is_exempt(jax.tree_util.keystr(path), jnp.ndim(x)), params
    )


def make_schedule(lr: float, *, total_steps: int, lr_schedule: str = "constant", warmup_steps: int = 0,
                  min_lr: float = 0.0):
    """lr as a function of the step count before the update (step 0 is the first update).

    Warmup is linear from 0 to lr over `warmup_steps` (optax's convention: step 0 gets 0), then
    constant, or cosine from lr to min_lr reached at `total_steps` and held after.
    """
    lr, warmup_steps, min_lr = float(lr), int(warmup_steps), float(min_lr)
    check_schedule(lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr)
    if lr_schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps]
        )
    if warmup_steps == 0:
        alpha = 0.0 if lr == 0 else min_lr / lr
        return optax.cosine_decay_schedule(lr, int(total_steps), alpha=alpha)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, int(total_steps), end_value=min_lr)


def build_optimizer(
    name: str,
    *,
    lr: float,
    total_steps: int,
    betas=None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    wd_exempt_1d: bool = False,
    grad_clip: float = 1.0,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    min_lr: float = 0.0,
) -> optax.GradientTransformation:
    """The training chain. `lion` is the paper's update (optax.lion), `lion_v29` the seed run's."""
    check_optimizer(name, lr=float(lr), weight_decay=float(weight_decay), lr_schedule=lr_schedule,
                    warmup_steps=int(warmup_steps), total_steps=total_steps, min_lr=float(min_lr))
    b1, b2 = (float(b) for b in (DEFAULT_BETAS[name] if betas is None else betas))
    wd = float(weight_decay)
    mask = decay_mask if wd_exempt_1d else None  # v29 decays every parameter
    schedule = make_schedule(lr, total_steps=total_steps, lr_schedule=lr_schedule,
                             warmup_steps=warmup_steps, min_lr=min_lr)

    def factory(learning_rate):
        if name == "lion":
            return optax.lion(learning_rate, b1=b1, b2=b2, weight_decay=wd, mask=mask)
        if name == "lion_v29":
            return optax.chain(
                lion_v29(b1, b2),
                optax.add_decayed_weights(wd, mask),
                optax.scale_by_learning_rate(learning_rate),
            )
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=float(eps), weight_decay=wd, mask=mask)

    # The learning rate stays fp32 with bf16 parameters (optax would store it in the parameter
    # dtype: 3e-4 -> 2.995e-4); the update is formed in fp32 and rounded once, as torch does.
    opt = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(learning_rate=schedule)
    if grad_clip is not None and float(grad_clip) > 0:
        return optax.chain(optax.clip_by_global_norm(float(grad_clip)), opt)
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
