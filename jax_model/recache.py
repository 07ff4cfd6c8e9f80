"""A cache's tokens stored again under another policy (the online self-optimizing cache policy
switches policy as the context grows). Mirrors torch_ref/recache.py."""

from __future__ import annotations

from typing import Any

from dba.errors import UserError
from dba.kvspec import KVPolicy
from jax_model import kvcache as kvc
from jax_model.layers import hadamard


def _plain(stream: kvc.StreamCache, x):
    """A rotated stream's values as the keys themselves (H H = n I; `write` rotates them again
    for a rotated stream of the new policy)."""
    return hadamard(x, stream.rot_dim) / stream.rot_dim if stream.rot_dim else x


def recache(cfg: Any, cache: kvc.Cache, policy: KVPolicy, max_len: int | None = None) -> kvc.Cache:
    """A new cache under `policy` (capacity `max_len`, default the old one's), holding the same
    tokens: each stream's
    values as the old cache returns them (dequantized, the window exact) are written again, so
    only what the new policy requires is re-quantized (an unchanged stream keeps its values; a
    stream moving to a coarser kind is quantized once more)."""
    length = int(cache.pos)
    batch = next(iter(cache.layers[0].values())).data.shape[0]
    if max_len is not None and max_len < length:
        raise UserError(f"a cache of {max_len} cannot hold the {length} tokens cached")
    new = kvc.init_cache(cfg, policy, batch, cache.max_len if max_len is None else max_len)
    if length == 0:
        return new
    layers = []
    for old_layer, new_layer in zip(cache.layers, new.layers):
        streams = {}
        for name, old in old_layer.items():
            streams[name] = kvc.write(new_layer[name], _plain(old, kvc.read(old, 0, length, length)), 0)
        layers.append(streams)
    return new.replace(layers=tuple(layers), pos=cache.pos)
