"""dba: decoupled bottleneck attention — framework-neutral core (no jax, no torch imports)."""

from dba.config import ConfigError, ModelConfig, preset
from dba.errors import UserError

__all__ = ["ModelConfig", "ConfigError", "UserError", "preset", "KVPolicy", "kv_bytes", "human_bytes"]


def __getattr__(name):  # KV accounting lives in dba.kvspec; imported lazily to keep this light
    if name in ("KVPolicy", "kv_bytes"):
        from dba import kvspec

        return getattr(kvspec, name)
    if name == "human_bytes":
        from dba.units import human_bytes

        return human_bytes
    raise AttributeError(name)
