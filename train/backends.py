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

