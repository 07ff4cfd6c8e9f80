"""The torch device of `dba train --backend torch --device ...`, checked against this machine."""

from __future__ import annotations

from dba.errors import UserError


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
