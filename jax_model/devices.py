"""The JAX platform of every command on the JAX path (`dba train`, `dba sample --backend jax`,
`dba eval`, the benchmarks): one selector, set before JAX starts a backend. Mirrors
torch_ref/devices.py (the torch device)."""

from __future__ import annotations

import os
import sys

from dba.errors import UserError

# --device -> JAX platform name ("gpu" lets JAX pick CUDA or ROCm)
PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}


def select_platform(device: str | None) -> None:
    """Make JAX use the platform `--device` names (None or "auto": JAX's own choice). Called before
    JAX starts a backend; once one is running (an in-process caller), what exists is kept."""
    if device is None or device == "auto":
        return
    if device not in PLATFORMS:
        raise UserError(f"--device {device!r}: the JAX path runs on auto, cpu, gpu (cuda) or tpu "
                        f"(mps and cuda:N are served by the torch path)")
    platform = PLATFORMS[device]
    if "jax" in sys.modules:
        import jax

        try:
            jax.config.update("jax_platforms", platform)
        except Exception:  # backends already initialised: keep what exists
            pass
    else:
        os.environ["JAX_PLATFORMS"] = platform
