"""Test-only fault injection (`DBA_FAULT`) and the non-finite step kinds, framework-free.

Shared by both trainers: the JAX step (train/step.py) and checkpoints (train/orbax_checkpoints.py),
the torch step (torch_train/step.py) and checkpoints (torch_train/checkpoints.py), and the loop
(train/run.py). Imports neither JAX nor torch.
"""

from __future__ import annotations

import errno
import os
import signal

from dba.errors import UserError

FAULT_ENV = "DBA_FAULT"
FAULT_RING = 16  # the device keeps the step and kind of this many latest non-finite steps
NONFINITE_LOSS, NONFINITE_GRAD = 1, 2  # bits of a non-finite step's kind


def fault_points(name: str) -> set[int]:
    """TEST-ONLY fault injection: the steps given to hook `name` in the DBA_FAULT environment
    variable, a comma-separated list of `hook:step` (e.g. `nan_loss_at:5,kill_in_save:8`).

    Hooks (read where they act): nan_loss_at / nan_grad_at (train/step.py, torch_train/step.py),
    kill_in_save / enospc_in_save / kill_after_save (train/orbax_checkpoints.py,
    torch_train/checkpoints.py), pause_at_step (train/run.py). Used by tests/test_faults.py to
    inject crashes, disk-full errors and NaNs at exact points of a real run; never set it for
    real training.
    """
    out: set[int] = set()
    for item in os.environ.get(FAULT_ENV, "").split(","):
        hook, _, arg = item.strip().partition(":")
        if hook == name:
            try:
                out.add(int(arg))
            except ValueError:
                raise UserError(f"{FAULT_ENV}: bad item {item.strip()!r} (expected {name}:STEP)", 2) from None
    return out


def nonfinite_kind_text(kind: int) -> str:
    parts = [n for bit, n in ((NONFINITE_LOSS, "loss"), (NONFINITE_GRAD, "grad_norm")) if kind & bit]
    return " and ".join(parts) or "unknown"


def write_failure(e: BaseException) -> str | None:
    """A short reason when `e` is a failure to write files (an OSError such as ENOSPC, EDQUOT,
    EACCES, EROFS; an error from Orbax/TensorStore or torch.save's writer whose text carries one),
    else None: what both trainers' checkpoint writers turn into a one-line UserError."""
    full = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
    if isinstance(e, OSError):
        why = os.strerror(e.errno) if e.errno else (str(e) or type(e).__name__)
    else:
        text = str(e)
        why = next((t for t in (*full, os.strerror(errno.EROFS), os.strerror(errno.EACCES)) if t in text), None)
        if why is None and isinstance(e, RuntimeError) and ("inline_container" in text or "file write" in text):
            why = f"the write failed ({text.strip().splitlines()[0][:160]})"
    if why in full:
        return f"the disk is full ({why})"
    return why


def fault_kill(where: str) -> None:
    print(f"DBA_FAULT: SIGKILL {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
