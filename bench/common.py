"""Shared benchmark pieces: the reference configs, timing, and table printing."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

from dba.config import ModelConfig

# Config A of the issues: the 2-core reference point v29 was measured on.
CONFIG_A = dict(vocab_size=8192, block_size=256, n_layer=4, n_head=8, d_model=256, d_ff=1024, embed_dim=256,
                attn_mode="decoupled", sem_dim=32, geo_dim=64, attn_dim=96)
# The seed run's model (shared/seed/run_summary.md).
SEED = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768, d_ff=3072, embed_dim=512,
            attn_mode="decoupled", sem_dim=48, geo_dim=96, attn_dim=144)
CONFIGS = {"A": CONFIG_A, "seed": SEED}


def named_config(name: str, **overrides: Any) -> ModelConfig:
    return ModelConfig(**{**CONFIGS[name], **overrides})


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest wall time of `repeats` calls (the call must block until its work is done)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def best_per_call(fn: Callable[[], Any], sync: Callable[[Any], Any], calls: int, repeats: int) -> float:
    """Fastest time per call over `repeats` rounds of `calls` back-to-back calls of `fn` and one
    `sync` of the last result (on an accelerator queued calls leave no dispatch gaps)."""
    def rounds():
        for _ in range(calls):
            out = fn()
        sync(out)

    return best_of(rounds, repeats) / calls


DEVICE_HELP = "torch's device: auto (cuda, then mps, when present; else cpu), cpu, cuda, mps"


def bench_main(prog: str, doc: str, add_arguments: Callable, run: Callable, argv: list[str] | None) -> int:
    """`python -m bench.NAME`: the same arguments and run as `dba bench NAME`."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |")


def machine() -> dict[str, Any]:
    import os

    return {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


def torch_device(name: str) -> str:
    """`--device auto` -> cuda, then mps, when present, else cpu; a named device must exist."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {name}: torch sees no such device here")
    if name not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"--device {name!r}: choose auto, cpu, cuda or mps")
    return name


def torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()
