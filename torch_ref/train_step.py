"""One training step of the PyTorch reference, mirroring train/step.py (the JAX step):

    for each of the A micro-batches: loss_i = CE(model(x_i), y_i); grads += d(loss_i / A)
    norm = global L2 norm of the averaged grads; clip to grad_clip (optax's rule); optimizer step;
    scheduler step.  Returns the mean micro-batch loss, the pre-clip norm and the lr used.

Used by parity_tests/test_train_parity.py: from the same weights and batches the JAX and torch
steps give the same losses. Never imports JAX.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from torch_ref.model import DBAModel
from torch_ref.optim import build_optimizer, clip_and_step


def micro_loss(model: DBAModel, x_BT, y_BT) -> torch.Tensor:
    logits = model(x_BT)
    y = model.as_tokens(y_BT)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def train_step(model: DBAModel, optimizer: torch.optim.Optimizer, x_ABT, y_ABT, *, grad_clip: float = 1.0,
               scheduler=None) -> dict[str, float]:
    """One optimizer step over A = len(x_ABT) micro-batches (int arrays/tensors (A, B, T))."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_micro = len(x_ABT)
    total = 0.0
    for i in range(n_micro):
        loss = micro_loss(model, x_ABT[i], y_ABT[i])
        (loss / n_micro).backward()
        total += float(loss.detach())
    lr = float(optimizer.param_groups[0]["lr"])
    params = [p for p in model.parameters() if p.requires_grad]
    norm = clip_and_step(optimizer, params, grad_clip, scheduler)
    return {"loss": total / n_micro, "grad_norm": float(norm), "lr": lr}


@torch.no_grad()
def eval_loss(model: DBAModel, x_NBT, y_NBT) -> float:
    """Mean loss over N batches (the JAX Stepper.eval_loss)."""
    model.eval()
    return sum(float(micro_loss(model, x, y)) for x, y in zip(x_NBT, y_NBT)) / len(x_NBT)


class TorchTrainer:
    """Model + optimizer + scheduler built with the JAX trainer's knobs (train/optim.py names)."""

    def __init__(self, model: DBAModel, optimizer: str = "adamw", *, lr: float, total_steps: int,
                 grad_clip: float = 1.0, **opt_kwargs: Any):
        self.model = model
        self.grad_clip = grad_clip
        self.optimizer, self.scheduler = build_optimizer(
            optimizer, lr=lr, total_steps=total_steps, grad_clip=grad_clip,
            named_params=list(model.named_parameters()), **opt_kwargs)

    def step(self, x_ABT, y_ABT) -> dict[str, float]:
        return train_step(self.model, self.optimizer, x_ABT, y_ABT, grad_clip=self.grad_clip,
                          scheduler=self.scheduler)
