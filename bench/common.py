"""Shared benchmark pieces: the reference configs, timing, and table printing."""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from dba.config import ModelConfig
from dba.errors import UserError

# Config A of the issues: the 2-core reference point v29 was measured on.
CONFIG_A = dict(vocab_size=8192, block_size=256, n_layer=4, n_head=8, d_model=256, d_ff=1024, embed_dim=256,
                attn_mode="decoupled", sem_dim=32, geo_dim=64, attn_dim=96)
# The seed run's model (shared/seed/run_summary.md).
SEED = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768, d_ff=3072, embed_dim=512,
            attn_mode="decoupled", sem_dim=48, geo_dim=96, attn_dim=144)
CONFIGS = {"A": CONFIG_A, "seed": SEED}


def named_config(name: str, **overrides: Any) -> ModelConfig:
    return ModelConfig(**{**CONFIGS[name], **overrides})


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum`; anything else is a one-line usage error naming it."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int, nonneg_int = int_at_least(1), int_at_least(0)


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
    args = p.parse_args(argv)
    try:
        return int(run(args) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code


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

    from dba.resources import cpu_name

    return {"machine": platform.machine(), "processor": cpu_name(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:  # a temporary name, then renamed: an earlier file of that name is never left half-written
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        tmp.replace(path)
        print(f"\nwrote {path}")


def _report_call(fn: Callable, args: tuple, kwargs: dict) -> tuple:
    # A SystemExit would kill the pool's worker and leave the parent waiting for ever; an
    # exception object may not pickle. Both come back as plain values.
    try:
        return "ok", fn(*args, **kwargs)
    except UserError as e:
        return "user", str(e), e.code
    except SystemExit as e:
        return "user", str(e.code), 1
    except Exception:
        return "failed", traceback.format_exc()


def in_fresh_process(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a newly spawned process: its own XLA or torch thread pools, malloc
    settings and environment, none of them shared with another backend's run. A user error there
    is raised here as a UserError with the same message; any other failure as a RuntimeError
    carrying the child's traceback."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        status, *rest = pool.apply(_report_call, (fn, args, kwargs))
    if status == "ok":
        return rest[0]
    if status == "user":
        raise UserError(rest[0], rest[1])
    raise RuntimeError(f"the benchmark's {getattr(fn, '__name__', 'child')} process failed:\n{rest[0]}")


DEVICES = ("auto", "cpu", "cuda", "mps")


def torch_device(name: str) -> str:
    """`--device` (auto: cuda, then mps, else cpu) as the device type the benchmarks compare
    against ('cpu', 'cuda', 'mps'), through torch_ref.devices (a device this machine lacks: one line)."""
    from torch_ref.devices import torch_device as resolve

    return resolve(name).type


def torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def bench_optim(args):
    """The optimizer group every training benchmark steps with, in both frameworks: --optimizer
    at lr 3e-4, weight decay 0.1, clip 1.0, a constant schedule."""
    from train.config import OptimConfig

    return OptimConfig(name=args.optimizer, lr=3e-4, weight_decay=0.1, grad_clip=1.0)


def run_dba(*argv: Any, log: Path | None = None):
    """`dba ARGV...` in a fresh interpreter (the benches' stages), output captured (and written to
    `log` when given); a failure is a one-line UserError with the command's last stderr line."""
    import os
    import subprocess

    argv = [str(a) for a in argv]
    r = subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
    if log is not None:
        log.write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise UserError(f"`dba {' '.join(argv[:2])} ...` failed (exit {r.returncode}): "
                        f"{(r.stderr.strip().splitlines() or ['?'])[-1]}", 1)
    return r


def run_complete(run: Path) -> bool:
    """A run directory whose train.jsonl ended with `done`, reason complete."""
    from dba.runlog import read_events

    log = Path(run) / "train.jsonl"
    return log.is_file() and any(e.get("reason") == "complete" for e in read_events(log, "done"))
