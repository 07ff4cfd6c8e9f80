"""A cache's tokens stored again under another policy (the online self-optimizing cache policy
switches policy as the context grows). Mirrors jax_model/recache.py."""

from __future__ import annotations

from typing import Any

from dba.errors import UserError
from dba.kvspec import KVPolicy
from torch_ref import kvcache as kvc
from torch_ref.layers import hadamard


def _plain(stream: kvc.StreamCache, x):
    """A rotated stream's values as the keys themselves (see the JAX mirror)."""
    return hadamard(x, stream.rot_dim) / stream.rot_dim if stream.rot_dim else x


def recache(cfg: Any, cache: kvc.Cache, policy: KVPolicy, max_len: int | None = None) -> kvc.Cache:
    """A new cache under `policy` (capacity `max_len`, default the old one's), holding the same
    tokens (see the JAX mirror); the old cache is left as it was."""
    length = int(cache.pos)
    first = next(iter(cache.layers[0].values()))
    if max_len is not None and max_len < length:
        raise UserError(f"a cache of {max_len} cannot hold the {length} tokens cached")
    new = kvc.init_cache(cfg, policy, first.data.shape[0], cache.max_len if max_len is None else max_len,
                         device=first.data.device)
    if length == 0:
        return new
    for old_layer, new_layer in zip(cache.layers, new.layers):
        for name, old in old_layer.items():
            kvc.write(new_layer[name], _plain(old, kvc.read(old, 0, length, length)), 0)
    new.pos = length
    return new
