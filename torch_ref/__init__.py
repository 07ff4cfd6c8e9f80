"""PyTorch reference of the decoupled bottleneck transformer (never imports JAX)."""

from torch_ref import decode, kvcache, optim
from torch_ref.decode import decode_logits
from torch_ref.weights_io import canonical_state, load, load_canonical, save_export, save_v29
from torch_ref.loss import cross_entropy
from torch_ref.devices import default_device
from torch_ref.model import DBAModel
from torch_ref.sampling import generate

__all__ = ["DBAModel", "default_device", "cross_entropy", "load", "canonical_state", "load_canonical", "save_export",
           "save_v29", "generate", "decode_logits", "kvcache", "optim", "decode"]
