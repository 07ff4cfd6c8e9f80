"""The torch optimizers: Lion (the paper's, or v29's variant) and AdamW, doing optax's arithmetic
in optax's order, so one gradient sequence gives the same parameters here and in the JAX chain
(train/optim.py; parity_tests/test_optim_parity.py). torch_train/'s trainer steps with these.

Per parameter p with gradient g, first moment m (and second moment v for AdamW), at learning
rate lr and decay wd (0 where dba.optimizers.decays says no):

    lion      u = sign(b1*m + (1-b1)*g);   m = b2*m + (1-b2)*g
    lion v29  c = b1*m + (1-b1)*g; u = sign(c);   m = b2*c + (1-b2)*g      (SPEC §7)
    adamw     m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; u = (m/bc1) / (sqrt(v/bc2) + eps)
    then      p = p + (u + wd*p) * (-lr)                       (decoupled decay on the old p)

Differences from `torch.optim`, each because the trainer needs it:
- `group["lr"]` may be a 0-d tensor on the device (the trainer's schedule, evaluated there), so
  a step never reads a value back to the host;
- `step(apply=ok)` with a bool 0-d tensor applies the update only where `ok` is true (parameters,
  moments and the update count stay as they were otherwise), selected on the device: a step with a
  non-finite loss or gradient is skipped without a sync;
- bf16/fp16 parameters are updated in fp32 (read up, updated, rounded once) and their moments
  are kept in the parameter dtype, as optax keeps them;
- the state exists from construction (optax's `init`), so a checkpoint taken before the first
  step has moments to save.

`clip_by_global_norm` is optax's global-norm clip (unchanged below the limit, else scaled to it;
no epsilon, unlike torch's clip_grad_norm_).
"""

from __future__ import annotations

import torch

from dba.optimizers import ADAM_EPS


class _OptaxOrder(torch.optim.Optimizer):
    """Shared step: per-parameter moments, an update count, the masked in-place write."""

    moment_names: tuple[str, ...] = ("exp_avg",)

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = torch.zeros((), dtype=torch.int32, device=p.device)
                for name in self.moment_names:
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _direction(self, group: dict, state: dict, g32: torch.Tensor,
                   count: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(u, {moment name: new value}) in fp32."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None, *, apply: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            neg_lr = -lr
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                full = p.dtype == torch.float32
                p32 = p if full else p.float()
                g32 = p.grad if full else p.grad.float()
                count = state["step"] + 1
                u, moments = self._direction(group, state, g32, count)
                if wd != 0.0:  # optax.add_decayed_weights
                    u = u + wd * p32
                p_new = p32 + u * neg_lr  # scale_by_learning_rate, apply_updates
                if apply is None:
                    p.copy_(p_new)
                    for name, value in moments.items():
                        state[name].copy_(value)
                    state["step"] = count
                    continue
                p.copy_(torch.where(apply, p_new.to(p.dtype), p))
                for name, value in moments.items():
                    state[name].copy_(torch.where(apply, value.to(p.dtype), state[name]))
                state["step"] = torch.where(apply, count, state["step"])
        return loss

    def moments(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The moment buffers of parameter `p` (for checkpoints)."""
        return {name: self.state[p][name] for name in self.moment_names}


class Lion(_OptaxOrder):
    """Lion (Chen et al. 2023), optax.lion's arithmetic; `variant="v29"` is v29's in-place
    momentum (m = b2*c + (1-b2)*g), SPEC §7. sign(0) = 0, as in v29 and optax."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, variant: str = "paper"):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if variant not in ("paper", "v29"):
            raise ValueError(f"Lion variant must be 'paper' or 'v29', got {variant!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), weight_decay=float(weight_decay),
                                      variant=variant))

    def _direction(self, group, state, g32, count):
        b1, b2 = group["betas"]
        m = state["exp_avg"]
        m32 = m if m.dtype == torch.float32 else m.float()
        if group["variant"] == "paper":  # optax.scale_by_lion
            return torch.sign((1 - b1) * g32 + b1 * m32), {"exp_avg": (1 - b2) * g32 + b2 * m32}
        c = b1 * m32 + (1 - b1) * g32
        return torch.sign(c), {"exp_avg": b2 * c + (1 - b2) * g32}


class AdamW(_OptaxOrder):
    """AdamW with optax.adamw's arithmetic (bias corrections from the update count, eps outside
    the square root) and decoupled decay scaled by the learning rate."""

    moment_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps: float = ADAM_EPS, weight_decay: float = 0.0):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), eps=float(eps),
                                      weight_decay=float(weight_decay)))

    def _direction(self, group, state, g32, count):
        b1, b2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m32 = m if m.dtype == torch.float32 else m.float()
        v32 = v if v.dtype == torch.float32 else v.float()
        c = count.to(torch.float32)
        bc1, bc2 = 1 - torch.pow(b1, c), 1 - torch.pow(b2, c)
        m_new = (1 - b1) * g32 + b1 * m32
        v_new = (1 - b2) * (g32 * g32) + b2 * v32
        return (m_new / bc1) / (torch.sqrt(v_new / bc2) + group["eps"]), {"exp_avg": m_new, "exp_avg_sq": v_new}


def make(name: str, groups, *, lr, betas, eps: float = ADAM_EPS) -> _OptaxOrder:
    """The optimizer `name` ('lion' | 'lion_v29' | 'adamw', dba.optimizers.OPTIMIZERS) over
    parameter `groups` (each with its own "weight_decay")."""
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name in ("lion", "lion_v29"):
        return Lion(groups, lr=lr, betas=betas, variant="paper" if name == "lion" else "v29")
    raise ValueError(f"unknown optimizer {name!r}")


@torch.no_grad()
def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float | None,
                        norm: torch.Tensor) -> list[torch.Tensor]:
    """optax.clip_by_global_norm: the gradients untouched where `norm` < max_norm, else scaled by
    max_norm / norm (selected on the device; `norm` is the global L2 norm of `grads`, which the
    caller has computed anyway). None or 0 turns clipping off."""
    if max_norm is None or max_norm <= 0:
        return list(grads)
    trigger = norm < max_norm
    return [torch.where(trigger, g, g / norm.to(g.dtype) * max_norm) for g in grads]


@torch.no_grad()
def global_norm(grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the global L2 norm of `grads` in fp32, each tensor's squared norm)."""
    sq = [torch.linalg.vector_norm(g, 2, dtype=torch.float32).square() for g in grads]
    return torch.stack(sq).sum().sqrt(), sq
