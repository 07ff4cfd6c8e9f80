"""Flax NNX model of the decoupled bottleneck transformer (never imports torch)."""

from jax_model import decode, kvcache
from jax_model.decode import decode_logits
from jax_model.weights_io import canonical_state, load, load_canonical, save_export
from jax_model.loss import cross_entropy
from jax_model.model import DBAModel
from jax_model.sampling import generate

__all__ = ["DBAModel", "cross_entropy", "load", "canonical_state", "load_canonical", "save_export",
           "generate", "decode_logits", "kvcache", "decode"]
