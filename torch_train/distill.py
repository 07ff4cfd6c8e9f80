"""Distillation terms of the torch train step (`dba train --backend torch --distill-from TEACHER`).
Mirrors train/distill.py (see there for the phases and the objectives): the teacher is a frozen
torch_ref model on the student's device, run under no_grad inside the step. Never imports JAX."""

from __future__ import annotations

import torch

from torch_ref.loss import cross_entropy


def kd_terms(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, targets_BT: torch.Tensor,
             temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(temp^2 KL(teacher || student) at temperature temp, the data's cross-entropy), fp32 means
    over positions."""
    ls = torch.log_softmax(student_BTV.float() / temp, dim=-1)
    lt = torch.log_softmax(teacher_BTV.detach().float() / temp, dim=-1)
    kl = torch.mean(torch.sum(lt.exp() * (lt - ls), dim=-1)) * (temp * temp)
    return kl, cross_entropy(student_BTV, targets_BT)


@torch.no_grad()
def attention_io(model, idx_BT: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (the residual stream entering it, its attention's output) of the full forward."""
    positions = torch.arange(idx_BT.shape[1], device=idx_BT.device)
    x = model.embed(idx_BT)
    out = []
    for block in model.blocks:
        a, _ = block.attn(block.ln1(x), positions)
        out.append((x, a))
        x = x + a
        x = x + block.ff(block.ln2(x))
    return out


def blockwise_mse(student, teacher_io: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over layers of |a_s - a_t|^2 / |a_t|^2, each student layer fed the teacher's residual."""
    terms = []
    for block, (x, a_t) in zip(student.blocks, teacher_io):
        x = x.to(next(block.parameters()).dtype)
        a_s, _ = block.attn(block.ln1(x), torch.arange(x.shape[1], device=x.device))
        a_t = a_t.float()
        terms.append(torch.mean((a_s.float() - a_t) ** 2) / (torch.mean(a_t ** 2) + 1e-12))
    return torch.stack(terms).mean()


def blockwise_trainable(name: str) -> bool:
    """The parameters the blockwise phase trains (each block's attention and ln1)."""
    parts = name.split(".")
    return "attn" in parts or "ln1" in parts
