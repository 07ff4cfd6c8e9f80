"""Hadamard-rotated key streams (`k_sem=q4_0+rot`): the per-head width each rotated stream of a
model is rotated over, checked once here for both caches (`jax_model.kvcache.init_cache`,
`torch_ref.kvcache.init_cache`).

A rotated stream stores H k per head, H the unnormalised Sylvester-Hadamard matrix of the head
dim n (a fast Walsh-Hadamard transform: log2(n) stages of exact a+b, a-b), and cached attention
scores it against H q / n, so q.k is unchanged (H^T H = n I). Both need n to be a power of two.
"""

from __future__ import annotations

from typing import Any

from dba.errors import UserError


def rotation_dims(cfg: Any, policy: Any) -> dict[str, int]:
    """{stream name: head dim} for each key stream of `cfg` that `policy` rotates ({} when none):
    the stream width over the kv-heads. A one-line UserError when a head dim is not a power of two."""
    streams = cfg.kv_streams()
    out = {}
    for name in getattr(policy, "rotate", ()):
        if name not in streams:
            continue  # a stream this mode does not cache (KVPolicy.check_for names it)
        width, heads = streams[name], cfg.n_kv_head
        n = width // heads
        if n < 1 or n & (n - 1) or n * heads != width:
            raise UserError(f"{name}+rot needs a power-of-two head dim; {name} has head dim {n} "
                            f"({width} channels over {heads} heads)")
        out[name] = n
    return out
