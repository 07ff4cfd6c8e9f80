"""What the torch trainer can tell about this machine's precisions before training: how much faster
its bf16 matmuls are than fp32 ones (`dba train`'s first line on a CPU with bf16 matrix units)."""

from __future__ import annotations

import time

import torch


def bf16_speedup() -> float:
    """How many times faster a 768^3 bf16 matmul runs than an fp32 one on this CPU (the best of 8
    each, taken in turns so a neighbour's load hits both alike: ~50 ms)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(768, 768, generator=gen), torch.randn(768, 768, generator=gen)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    best = {name: float("inf") for name in pairs}
    for i in range(9):
        for name, (x, y) in pairs.items():
            t0 = time.perf_counter()
            x @ y
            if i:  # the first round warms up
                best[name] = min(best[name], time.perf_counter() - t0)
    return best["fp32"] / best["bf16"]


def runs_on_cpu(device: str) -> bool:
    """Whether the torch trainer's `--device` (auto: cuda, then mps, then cpu) is the CPU."""
    if device == "cpu":
        return True
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
