"""Host and device memory readings for the train log and the dashboard (cheap: no device sync)."""

from __future__ import annotations

import os
import resource
import sys
from typing import Any


def host_rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process in bytes; None where the OS does not say."""
    current = None
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return current, peak


def device_memory() -> dict[str, Any] | None:
    """The first local device's allocator stats (GPU/TPU), or None (XLA:CPU reports none)."""
    try:
        import jax

        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (no backend, or a platform without stats)
        return None
    return dict(stats) if stats else None
