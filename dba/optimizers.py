"""What both trainers' optimizers are, written once and framework-free: the names and their
defaults, the learning-rate schedule (`LRSchedule`), the weight-decay rule (`decays`) and their
checks.

The JAX chain (train/optim.py, optax) and the torch optimizers (torch_ref/optim.py, used by
torch_train/) evaluate the same `LRSchedule` with their own array module and ask `decays` which
parameters decay, so the two frameworks cannot drift apart; every command-line `choices` reads the
tuples here, so a name exists in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dba.errors import UserError

OPTIMIZERS = ("lion", "lion_v29", "adamw")
SCHEDULES = ("constant", "cosine")
DEFAULT_BETAS = {"lion": (0.9, 0.99), "lion_v29": (0.9, 0.99), "adamw": (0.9, 0.95)}
ADAM_EPS = 1e-8


def parse_betas(text: str, flag: str) -> tuple[float, float]:
    """'0.9,0.95' -> (0.9, 0.95); a one-line UserError naming `flag` otherwise."""
    try:
        parts = [float(x) for x in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) != 2 or not all(0.0 <= b < 1.0 for b in parts):
        raise UserError(f"--{flag.replace('_', '-')} must be two numbers in [0, 1) like '0.9,0.95', got {text!r}")
    return parts[0], parts[1]


def check_schedule(lr: float, *, lr_schedule: str = "constant", warmup_steps: int = 0,
                   total_steps: int | None = None, min_lr: float = 0.0) -> None:
    """One-line UserErrors for a learning-rate schedule that cannot be built. `total_steps=None`
    skips the check that needs the run length."""
    if lr_schedule not in SCHEDULES:
        raise UserError(f"unknown lr schedule {lr_schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if lr < 0:
        raise UserError(f"learning rate must be >= 0, got {lr}")
    if warmup_steps < 0:
        raise UserError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr_schedule == "cosine":
        if total_steps is not None and int(total_steps) <= int(warmup_steps):
            raise UserError(f"cosine schedule needs total_steps ({total_steps}) > warmup_steps ({warmup_steps})")
        if min_lr < 0 or min_lr > lr:
            raise UserError(f"min_lr must be in [0, lr={lr}], got {min_lr}")


def check_optimizer(name: str, *, lr: float = 0.0, weight_decay: float = 0.0, lr_schedule: str = "constant",
                    warmup_steps: int = 0, total_steps: int | None = None, min_lr: float = 0.0) -> None:
    """One-line UserErrors for an optimizer (and its schedule) that cannot be built."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if weight_decay < 0:
        raise UserError(f"weight_decay must be >= 0, got {weight_decay}")
    check_schedule(lr, lr_schedule=lr_schedule, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate as a function of the number of updates applied so far (`count`; the
    first update uses count 0):

        count < warmup_steps:  lr * count / warmup_steps              (linear from 0)
        constant:              lr
        cosine:                min_lr + (lr - min_lr) * (1 + cos(pi * t / (total - warmup))) / 2,
                               t = min(count - warmup_steps, total - warmup), held at min_lr after

    `at(count, xp)` evaluates it with the array module `xp` (numpy, jax.numpy or torch: only
    `where` and `cos` are used), so the optax chain, the torch trainer and a float check run the
    same formula; `count` is a float array (or a Python number with numpy)."""

    lr: float
    total_steps: int
    kind: str = "constant"  # --lr-schedule
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        check_schedule(float(self.lr), lr_schedule=self.kind, warmup_steps=int(self.warmup_steps),
                       total_steps=int(self.total_steps), min_lr=float(self.min_lr))

    def at(self, count: Any, xp: Any) -> Any:
        lr, w = float(self.lr), int(self.warmup_steps)
        if self.kind == "constant":
            value = count * 0.0 + lr
        else:
            span = int(self.total_steps) - w
            t = count - w
            t = xp.where(t > span, span, t)
            value = self.min_lr + (lr - self.min_lr) * 0.5 * (1.0 + xp.cos(t * (math.pi / span)))
        if w == 0:
            return value
        return xp.where(count < w, count * (lr / w), value)

    def __call__(self, count: float) -> float:
        """The rate at `count` as a Python float (numpy arithmetic in float64)."""
        import numpy as np

        return float(self.at(np.float64(count), np))


def decays(name: str, ndim: int, exempt_1d: bool) -> bool:
    """Whether weight decay applies to the parameter `name` (its path, dotted or as printed by
    jax.tree_util.keystr) of `ndim` dims. v29 decays every parameter; with `exempt_1d`
    (--wd-exempt-1d) the token embedding ("tok_emb" in the name) and tensors with ndim <= 1
    (norm scales, biases, temperatures) do not decay."""
    return not (exempt_1d and ("tok_emb" in name or ndim <= 1))
