"""Flax NNX model of the decoupled bottleneck transformer (never imports torch)."""

from jax_model.checkpoint import canonical_state, load, load_canonical, save_export
from jax_model.model import DBAModel, cross_entropy

__all__ = ["DBAModel", "cross_entropy", "load", "canonical_state", "load_canonical", "save_export",
           "generate", "kvcache", "decode"]


def __getattr__(name):
    import importlib

    if name in ("kvcache", "decode"):
        return importlib.import_module(f"jax_model.{name}")
    if name == "generate":
        from jax_model.generate import generate

        return generate
    raise AttributeError(name)
