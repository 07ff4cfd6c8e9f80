"""PyTorch reference of the decoupled bottleneck transformer (never imports JAX)."""

from torch_ref.checkpoint import canonical_state, load, load_canonical, save_export, save_v29
from torch_ref.model import DBAModel, default_device

__all__ = ["DBAModel", "default_device", "load", "canonical_state", "load_canonical", "save_export",
           "save_v29", "generate", "kvcache", "optim"]


def __getattr__(name):
    import importlib

    if name in ("kvcache", "optim", "decode"):
        return importlib.import_module(f"torch_ref.{name}")
    if name == "generate":
        from torch_ref.generate import generate

        return generate
    raise AttributeError(name)
