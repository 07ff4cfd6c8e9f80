"""Which framework trains a run, and on which device: `--backend auto|jax|torch` with `--device`.

JAX trains on cpu, gpu/cuda and tpu (and over meshes and hosts); the PyTorch trainer
(torch_train/, on torch_ref; its device check is torch_ref/devices.py) trains on cpu, cuda,
cuda:N and mps. With `--backend auto`:
mps and cuda:N go to torch; cuda/gpu go to JAX when it has a GPU backend here, else to torch
(the seed command line, `--device mps`, runs as written); everything else goes to JAX. A choice the
flags did not spell out is said in the run's first log line. A device this machine does not have
is a one-line error before anything is read or written.
"""

from __future__ import annotations

import os

from train.config import RunSettings


def _jax_has_gpu() -> bool:
    try:
        import jax

        return bool(jax.devices("gpu"))
    except Exception:
        return False


def choose_backend(run: RunSettings) -> tuple[str, str | None]:
    """("jax" | "torch", the note for the first log line when the flags did not name it)."""
    wants = run.wants_torch()
    if wants is None:  # auto with --device cuda/gpu
        if _jax_has_gpu():
            return "jax", None
        return "torch", f"--device {run.device}: JAX has no GPU backend here, so PyTorch trains (--backend torch)"
    if not wants:
        return "jax", None
    if run.backend == "torch":
        return "torch", None
    why = "JAX has no mps backend" if run.device == "mps" else "JAX cannot pick one GPU by index"
    return "torch", f"--device {run.device}: {why}, so PyTorch trains (--backend torch)"


def _torch_bf16_speedup() -> float:
    """How many times faster a 768^3 bf16 matmul runs than an fp32 one on this CPU (torch; the
    best of 8 each, taken in turns so a neighbour's load hits both alike: ~50 ms)."""
    import time

    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(768, 768, generator=gen), torch.randn(768, 768, generator=gen)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    best = {}
    for _ in range(9):
        for name, (x, y) in pairs.items():
            t0 = time.perf_counter()
            x @ y
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0) if name in best else float("inf")
    return best["fp32"] / best["bf16"]


def _torch_runs_on_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def cpu_precision_note(run: RunSettings, backend: str) -> str | None:
    """For the first log line of a run on a CPU with bf16 matrix units whose flags did not choose
    a precision (the caller checks that): which precision the framework that trains runs faster
    here. torch: a bf16 matmul is timed against an fp32 one; JAX: XLA:CPU has no bf16 matrix
    path (measured with every XLA flag of the pinned jaxlib: bf16 slower than fp32), so fp32."""
    from dba.resources import bf16_matrix_units

    units = bf16_matrix_units()
    if units is None or run.device not in ("auto", "cpu"):
        return None
    if backend == "jax":
        if run.device == "auto" and os.path.exists("/dev/nvidiactl"):  # JAX may train on a GPU
            return None
        return (f"this CPU has bf16 matrix units ({units}), which XLA:CPU does not use: fp32 (the default) is "
                "JAX's faster precision here; --backend torch --amp --compile uses them")
    if not _torch_runs_on_cpu(run.device):
        return None
    r = _torch_bf16_speedup()
    if r < 1.2:
        return f"this CPU has bf16 matrix units ({units}), but a bf16 matmul ran only {r:.1f}x fp32's here: fp32"
    return (f"this CPU has bf16 matrix units ({units}): a bf16 matmul ran {r:.1f}x fp32's here, so --amp "
            "(bf16 autocast, fp32 weights) trains faster, with --compile faster still; fp32 as the flags say")
