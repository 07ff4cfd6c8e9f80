"""Which framework trains a run, and on which device: `--backend auto|jax|torch` with `--device`.

JAX trains on cpu, gpu/cuda and tpu (and over meshes and hosts); the PyTorch trainer
(train/torch_run.py, on torch_ref) trains on cpu, cuda, cuda:N and mps. With `--backend auto`:
mps and cuda:N go to torch; cuda/gpu go to JAX when it has a GPU backend here, else to torch
(the seed command line, `--device mps`, runs as written); everything else goes to JAX. A choice the
flags did not spell out is said in the run's first log line. A device this machine does not have
is a one-line error before anything is read or written.
"""

from __future__ import annotations

from dba.errors import UserError
from train.config import RunSettings


def _jax_has_gpu() -> bool:
    try:
        import jax

        return bool(jax.devices("gpu"))
    except Exception:  # noqa: BLE001 (no CUDA plugin, no driver, no device: JAX cannot serve it)
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


def torch_device(device: str) -> str:
    """The torch device for `--device` ("cpu", "cuda:N", "mps"), checked against this machine."""
    try:
        import torch
    except ImportError:
        raise UserError("--backend torch needs PyTorch: pip install torch (see the README's set-up)", 1) from None
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "mps":
        if not has_mps:
            raise UserError("--device mps: this machine has no MPS device (PyTorch's MPS needs Apple Silicon and "
                            "macOS 12.3+ with an MPS-enabled torch build); use --device cpu", 1)
        return "mps"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: PyTorch sees no CUDA device on this machine (torch "
                        f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu", 1)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}", 1)
    return f"cuda:{index}"
