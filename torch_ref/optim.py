"""Optimizers for the PyTorch reference, mirroring train/optim.py step for step.

Lion (paper or v29 variant), AdamW, the same lr schedules (as LambdaLR) and the same global-norm
clip, so one gradient sequence gives the same parameters in both frameworks (parity_tests).
Weight decay everywhere is v29's: decoupled, p *= 1 - lr*wd, before the update.
"""

from __future__ import annotations

import math

import torch

from dba.optimizers import DEFAULT_BETAS, check_optimizer, check_schedule


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023). Per step, for each parameter p with gradient g and momentum m:

        p *= 1 - lr*wd;  c = b1*m + (1-b1)*g;  p -= lr*sign(c)
        paper: m = b2*m + (1-b2)*g        v29: m = b2*c + (1-b2)*g

    v29 updated its buffer in place (m became c before the second EMA); `variant="v29"`
    reproduces that so seed runs can be continued bit-for-bit in spirit (SPEC §7).
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 variant: str = "paper"):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if variant not in ("paper", "v29"):
            raise ValueError(f"Lion variant must be 'paper' or 'v29', got {variant!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, variant=variant))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, (b1, b2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                if wd != 0:
                    p.mul_(1.0 - lr * wd)
                c = m.mul(b1).add_(g, alpha=1.0 - b1)
                p.add_(torch.sign(c), alpha=-lr)  # sign(0) = 0, as in v29 and optax
                if group["variant"] == "paper":
                    m.mul_(b2).add_(g, alpha=1.0 - b2)
                else:
                    m.copy_(c.mul_(b2).add_(g, alpha=1.0 - b2))
        return loss


def schedule_value(step: int, lr: float, *, total_steps: int, lr_schedule: str = "constant",
                   warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """The same numbers as train.optim.make_schedule (optax): linear warmup from 0 (step 0 gets 0),
    then constant, or cosine from lr down to min_lr at total_steps, held after."""
    lr, w, T = float(lr), int(warmup_steps), int(total_steps)
    check_schedule(lr, lr_schedule=lr_schedule, warmup_steps=w, total_steps=T, min_lr=float(min_lr))
    if step < w:
        return lr * step / w
    if lr_schedule == "constant":
        return lr
    alpha = 0.0 if lr == 0 else float(min_lr) / lr
    t = min(step - w, T - w)
    cos = 0.5 * (1.0 + math.cos(math.pi * t / (T - w)))
    return lr * ((1.0 - alpha) * cos + alpha)


def _is_exempt(name: str, p: torch.Tensor) -> bool:
    # Same rule as train.optim.decay_mask: embeddings and ndim <= 1 tensors get no decay.
    return "tok_emb" in name or p.ndim <= 1


def build_optimizer(name: str, params=None, *, lr: float, total_steps: int, betas=None, eps: float = 1e-8,
                    weight_decay: float = 0.0, wd_exempt_1d: bool = False, grad_clip: float = 1.0,
                    lr_schedule: str = "constant", warmup_steps: int = 0, min_lr: float = 0.0,
                    named_params=None):
    """(optimizer, scheduler) matching train.optim.build_optimizer.

    Pass `params` (tensors) or `named_params` (e.g. model.named_parameters()); the names are
    needed for wd_exempt_1d (embeddings are recognised by "tok_emb" in the name). Clipping is not
    part of a torch optimizer: call `clip_and_step(optimizer, params, grad_clip, scheduler)`.
    Call scheduler.step() after each optimizer step (clip_and_step does): step k uses schedule(k).
    """
    lr, weight_decay = float(lr), float(weight_decay)
    check_optimizer(name, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=int(warmup_steps),
                    total_steps=total_steps, min_lr=float(min_lr))
    del grad_clip  # applied by clip_and_step; accepted so both builders take the same arguments
    b1, b2 = (float(b) for b in (DEFAULT_BETAS[name] if betas is None else betas))

    if named_params is not None:
        named = list(named_params)
    elif params is not None:
        named = [(f"param{i}", p) for i, p in enumerate(params)]
        if wd_exempt_1d:
            raise ValueError("wd_exempt_1d needs named_params to recognise embeddings by name")
    else:
        raise ValueError("pass params or named_params")
    named = [(n, p) for n, p in named if p.requires_grad]

    if wd_exempt_1d:
        decay = [p for n, p in named if not _is_exempt(n, p)]
        no_decay = [p for n, p in named if _is_exempt(n, p)]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    else:  # v29: every parameter decays
        groups = [{"params": [p for _, p in named], "weight_decay": weight_decay}]

    if name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=float(eps), weight_decay=weight_decay)
    else:
        opt = Lion(groups, lr=lr, betas=(b1, b2), weight_decay=weight_decay,
                   variant="paper" if name == "lion" else "v29")

    def factor(step):
        return 0.0 if lr == 0 else schedule_value(step, lr, total_steps=total_steps, lr_schedule=lr_schedule,
                                                  warmup_steps=warmup_steps, min_lr=min_lr) / lr

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def clip_grads(params, grad_clip: float) -> float:
    """Scale gradients so their global L2 norm is at most grad_clip; return the norm before.

    Same rule as optax.clip_by_global_norm: untouched when norm < clip, else g * clip / norm.
    (torch's clip_grad_norm_ adds 1e-6 to the norm, a tiny mismatch we avoid.)
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if grad_clip is not None and grad_clip > 0 and not bool(norm < grad_clip):
        for g in grads:
            g.div_(norm).mul_(grad_clip)
    return float(norm)


def clip_and_step(optimizer, params, grad_clip: float, scheduler=None) -> float:
    """Clip (if grad_clip > 0), step the optimizer, then the scheduler. Returns the pre-clip norm."""
    params = list(params)
    norm = clip_grads(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return norm
