"""Device memory readings for the train log and the dashboard (cheap: no device sync); host
memory readings are framework-free, in dba/resources.py."""

from __future__ import annotations

from typing import Any


def device_memory() -> dict[str, Any] | None:
    """The first local device's allocator stats (GPU/TPU), or None (XLA:CPU reports none)."""
    try:
        import jax

        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (no backend, or a platform without stats)
        return None
    return dict(stats) if stats else None
