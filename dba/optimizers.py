"""Optimizer and learning-rate schedule names, their defaults and their checks (framework-free).

Both trainers build from these: `train/optim.py` (optax) and `torch_ref/optim.py` (torch), and
every command-line `choices` reads the tuples here, so a name exists in one place.
"""

from __future__ import annotations

from dba.errors import UserError

OPTIMIZERS = ("lion", "lion_v29", "adamw")
SCHEDULES = ("constant", "cosine")
DEFAULT_BETAS = {"lion": (0.9, 0.99), "lion_v29": (0.9, 0.99), "adamw": (0.9, 0.95)}


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
