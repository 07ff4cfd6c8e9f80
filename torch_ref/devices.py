"""The torch device of every command on the torch path (`dba sample`, `dba eval`, `dba train
--backend torch`, the benchmarks), checked against this machine: one resolver, one set of
messages. Mirrors jax_model/devices.py (the JAX platform)."""

from __future__ import annotations

import torch

from dba.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")  # and cuda:N


def _has_mps() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def default_device() -> torch.device:
    """cuda (its first device), then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("mps") if _has_mps() else torch.device("cpu")


def torch_device(name: str | None = "auto") -> torch.device:
    """`--device NAME` (None or "auto": `default_device`; cpu; cuda or gpu = cuda:0; cuda:N; mps)
    as a concrete torch.device; a device this machine lacks is a one-line UserError (exit 1)."""
    if name is None or name == "auto":
        return default_device()
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _has_mps():
            raise UserError("--device mps: this machine has no MPS device (PyTorch's MPS needs Apple Silicon and "
                            "macOS 12.3+ with an MPS-enabled torch build); use --device cpu", 1)
        return torch.device("mps")
    if name in ("cuda", "gpu") or (name.startswith("cuda:") and name[5:].isdigit()):
        index = int(name[5:]) if name.startswith("cuda:") else 0
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: PyTorch sees no CUDA device on this machine (torch "
                            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu", 1)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}", 1)
        return torch.device("cuda", index)
    raise UserError(f"--device {name!r}: the torch path runs on auto, cpu, cuda, cuda:N or mps")
