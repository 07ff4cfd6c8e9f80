"""Quantized KV cache for the JAX model (SPEC §5): quantize/dequantize and a pytree cache.

Mirrors `torch_ref/kvcache.py` function for function: same names, same storage layout, same
bytes. Geometry (block size, padding, ring length) comes from `dba.kvspec` so the bytes this
allocates are, by construction and by test, the ones `dba.kvspec.kv_bytes` reports.

The cache is a `flax.struct` pytree: arrays are leaves, each stream's `StreamSpec` (kind, width,
qblock, ring length) is static, so one jitted decode step serves every position (`pos` is an int32
array, never a Python int). `Attention` takes one layer's `LayerCache` and returns the updated one.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from dba.kvspec import (FOUR_BIT_KINDS, FP16_MAX, NF4_LEVELS, QMAX, KVPolicy, StreamSpec, non_finite_message,
                        quant_layout, require_quant, storage_layout, stream_spec)
from dba.rotation import rotation_dims
from jax_model.layers import hadamard

_NF4 = np.asarray(NF4_LEVELS, dtype=np.float32)


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def _check_finite(x: jax.Array) -> None:
    # Only a concrete (eager) array can be inspected; under jit the values are unknown, so the
    # check is skipped when traced: NaN/Inf then give garbage codes (and a NaN/Inf scale), never
    # an exception, and no device->host sync is added to the decode step. `write` (the traced
    # hot path) passes check_finite=False for the same reason.
    if isinstance(x, jax.core.Tracer):
        return
    if not bool(_all_finite(x)):
        raise ValueError(non_finite_message(np.asarray(x, dtype=np.float32)))


def quantize(x: jax.Array, kind: str, qblock: int, check_finite: bool = True) -> tuple[jax.Array, jax.Array]:
    """x (..., dim) float -> (q, scale): q int8 (..., pad_dim) for q8_0, packed uint8
    (..., pad_dim//2) for q4_0/nf4; scale float16 (..., n_blocks).

    SPEC §5, with the block scale capped at 65504 (the largest fp16) so any finite input
    dequantizes to finite values: a block past that range saturates. With `check_finite`, NaN/Inf
    input raises a one-line ValueError counting them when `x` is concrete; traced values cannot
    be inspected, so under jit the check is skipped (see `_check_finite`)."""
    require_quant(kind)
    x = jnp.asarray(x)
    quant_layout(kind, x.shape[-1], qblock)  # validates before tracing
    if check_finite:
        _check_finite(x)
    return _quantize(x, kind, qblock)


# One compiled program per (shape, kind, qblock) rather than op-by-op dispatch when called
# eagerly (4x faster to first result); inside an outer jit it is simply inlined.
@partial(jax.jit, static_argnums=(1, 2))
def _quantize(x: jax.Array, kind: str, qblock: int) -> tuple[jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    dim = x.shape[-1]
    qb, pad_dim, nb = quant_layout(kind, dim, qblock)
    lead = x.shape[:-1]
    if pad_dim != dim:  # zero channels never raise a block's absmax and quantize to code 0
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad_dim - dim)])
    xb = x.reshape(*lead, nb, qb)
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    # XLA's algebraic simplifier turns `a / constant` into `a * (1/constant)` and `a / broadcast(b)`
    # into `a * broadcast(1/b)`; both are off by an ulp now and then, which moves ties and
    # near-ties to the other code (q4_0 [6, 3, 0, -2] packed 251 instead of SPEC's 252) and can
    # flush 1/b to zero for b > 2**126. The barriers hide the divisors' structure so both
    # divisions are true IEEE quotients, as SPEC and the torch reference compute them.
    qmax = lax.optimization_barrier(jnp.full(amax.shape, QMAX[kind], jnp.float32))
    # Clamped to the largest fp16 so the stored scale is the one the codes were computed with:
    # a block whose absmax/qmax exceeds 65504 saturates (codes at the extremes) instead of
    # storing an inf scale that dequantizes to inf and 0 * inf = NaN.
    scale = jnp.clip(amax / qmax, np.float32(1e-8), np.float32(FP16_MAX))  # fp32, as SPEC says
    y = xb / lax.optimization_barrier(jnp.broadcast_to(scale, xb.shape))  # fp32 scale, not the fp16
    if kind == "q8_0":
        q = jnp.clip(jnp.round(y), -127, 127).astype(jnp.int8).reshape(*lead, pad_dim)
    else:
        if kind == "q4_0":
            u = (jnp.clip(jnp.round(y), -8, 7) + 8).astype(jnp.int32)
        else:
            u = _nf4_index(jnp.clip(y, -1.0, 1.0))
        u = u.reshape(*lead, pad_dim // 2, 2)
        q = (u[..., 0] * 16 + u[..., 1]).astype(jnp.uint8)  # even channel in the high nibble
    return q, scale.astype(jnp.float16).reshape(*lead, nb)


def _nf4_index(y: jax.Array) -> jax.Array:
    """Index of the nearest NF4 level, first index on ties (like argmin), without building a
    (..., 16) distance tensor: a running minimum over the 16 levels."""
    best = jnp.zeros(y.shape, jnp.int32)
    best_d = jnp.abs(y - _NF4[0])
    for i in range(1, 16):
        d = jnp.abs(y - _NF4[i])
        closer = d < best_d  # strict: an equal distance keeps the earlier level
        best = jnp.where(closer, i, best)
        best_d = jnp.where(closer, d, best_d)
    return best


def _nf4_values(u: jax.Array) -> jax.Array:
    """float32 NF4 level of each 4-bit code u (0..15): a binary tree of selects on the code's
    bits, lowest bit first. The same values as indexing the 16-entry table, but elementwise, so
    XLA vectorises it; the table gather ran one element at a time (2.7x slower per block, which
    made nf4 decode slower than an fp16 cache at 8k)."""
    level = [jnp.float32(v) for v in _NF4]
    for bit in range(4):
        on = ((u >> bit) & 1).astype(jnp.bool_)
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def dequantize(q: jax.Array, scale: jax.Array, kind: str, dim: int, qblock: int) -> jax.Array:
    """Inverse of `quantize`: float32 (..., dim) = code * float32(stored fp16 scale)."""
    require_quant(kind)
    quant_layout(kind, dim, qblock)
    return _dequantize(q, scale, kind, dim, qblock)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantize(q: jax.Array, scale: jax.Array, kind: str, dim: int, qblock: int) -> jax.Array:
    qb, pad_dim, nb = quant_layout(kind, dim, qblock)
    lead = q.shape[:-1]
    if kind == "q8_0":
        v = q.astype(jnp.float32)
    else:
        # Both nibbles by one broadcast shift (high nibble first), not a stack of two arrays: XLA
        # fuses it into one vectorised loop, 1.5x faster per decode block than the concatenate.
        u = ((q[..., None] >> jnp.array([4, 0], jnp.uint8)) & 15).reshape(*lead, pad_dim)
        v = u.astype(jnp.float32) - 8.0 if kind == "q4_0" else _nf4_values(u)
    out = v.reshape(*lead, nb, qb) * scale.astype(jnp.float32)[..., None]
    return out.reshape(*lead, pad_dim)[..., :dim]


# ---- the cache ---------------------------------------------------------------------------

@struct.dataclass
class StreamCache:
    """One cached sequence tensor of a layer: the arrays `dba.kvspec.storage_layout` names for its
    `spec` (data, scale or None, ring or None; the ring holds position p in slot p % residual).

    `spec` (kind, width, effective qblock, ring length) is static, the arrays are the leaves.
    `rot_dim`: for a rotated key stream (`spec.rotated`), the head dim its Hadamard rotation acts
    on (`write` stores H k per head, every read returns rotated keys); 0 otherwise."""

    data: jax.Array
    scale: jax.Array | None
    ring: jax.Array | None
    spec: StreamSpec = struct.field(pytree_node=False)
    rot_dim: int = struct.field(pytree_node=False, default=0)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def qblock(self) -> int:
        """The effective block (quant_layout's qb)."""
        return self.spec.qblock_eff

    @property
    def residual(self) -> int:
        """Ring length R; 0 = no ring."""
        return self.spec.residual

    @property
    def quantized(self) -> bool:
        return self.spec.quantized

    @property
    def max_len(self) -> int:
        return self.data.shape[1]


@struct.dataclass
class LayerCache:
    """One layer's streams (name -> StreamCache) and `pos`, the tokens they hold (int32 scalar):
    what `Attention` takes and returns."""

    streams: dict[str, StreamCache]
    pos: jax.Array

    @property
    def max_len(self) -> int:
        return next(iter(self.streams.values())).max_len


@struct.dataclass
class Cache:
    """Per-layer dicts of stream caches plus the number of cached tokens `pos` (int32 scalar)."""

    layers: tuple[dict[str, StreamCache], ...]
    pos: jax.Array

    @property
    def max_len(self) -> int:
        return next(iter(self.layers[0].values())).max_len

    def layer(self, i: int) -> LayerCache:
        """Layer i's streams at the cache's position."""
        return LayerCache(self.layers[i], self.pos)

    def with_layers(self, layers: Sequence[LayerCache]) -> Cache:
        """The cache holding these layers (all at one position): a new pytree."""
        return self.replace(layers=tuple(l.streams for l in layers), pos=layers[0].pos)


def _check_rot_dim(spec: StreamSpec, rot_dim: int) -> None:
    if spec.rotated != (rot_dim > 0) or (rot_dim and (rot_dim & (rot_dim - 1) or spec.dim % rot_dim)):
        raise ValueError(f"stream {spec.name}: rot_dim={rot_dim} for a {'rotated' if spec.rotated else 'plain'} "
                         f"stream of width {spec.dim} (a rotated stream needs its power-of-two head dim)")


def alloc_stream(spec: StreamSpec, batch: int, max_len: int, rot_dim: int = 0) -> StreamCache:
    """Zeroed storage for `spec` (its ring already clipped to max_len); `rot_dim` the head dim of a
    rotated stream (`dba.rotation.rotation_dims`), 0 for the others."""
    _check_rot_dim(spec, rot_dim)
    arrays = {k: None if a is None else jnp.zeros(a[0], jnp.dtype(a[1]))
              for k, a in storage_layout(spec, batch, max_len).items()}
    return StreamCache(arrays["data"], arrays["scale"], arrays["ring"], spec, rot_dim)


def init_stream(kind: str, dim: int, qblock: int, residual: int, batch: int, max_len: int,
                name: str = "") -> StreamCache:
    """Zeroed storage for one stream; `residual` is the requested window (clipped to max_len)."""
    return alloc_stream(stream_spec(name, kind, dim, qblock, residual, max_len), batch, max_len)


def init_cache(cfg: Any, policy: KVPolicy | None, batch: int, max_len: int) -> Cache:
    """A preallocated cache for `cfg` under `policy` (None: fp16) with room for max_len tokens."""
    policy = KVPolicy() if policy is None else policy
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"batch and max_len must be positive, got batch={batch}, max_len={max_len}")
    specs = {name: policy.stream(name, cfg, max_len=max_len) for name in cfg.kv_streams()}
    rot = rotation_dims(cfg, policy)
    layers = tuple({name: alloc_stream(spec, batch, max_len, rot.get(name, 0)) for name, spec in specs.items()}
                   for _ in range(cfg.n_layer))
    return Cache(layers, jnp.zeros((), jnp.int32))


def nbytes(cache: Cache | StreamCache) -> int:
    """Bytes really allocated by the storage, scale and ring arrays (pos not counted)."""
    streams = [cache] if isinstance(cache, StreamCache) else [s for l in cache.layers for s in l.values()]
    return int(sum(a.nbytes for s in streams for a in (s.data, s.scale, s.ring) if a is not None))


def write(stream: StreamCache, x_BTD: jax.Array, start: Any) -> StreamCache:
    """Store T tokens at positions start..start+T-1; returns the new stream.

    `start` may be traced (T is static). The caller guarantees start + T <= max_len
    (dynamic_update_slice would otherwise clamp the start). Values are not checked for NaN/Inf.
    A rotated stream stores H x per head (fp32 butterflies, before quantizing and before the
    fp16 ring), so the quantized store and the window hold the same rotated keys.
    """
    if stream.rot_dim:
        x_BTD = hadamard(x_BTD.astype(jnp.float32), stream.rot_dim)
    T = x_BTD.shape[1]
    start = jnp.asarray(start, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    if not stream.quantized:
        data = lax.dynamic_update_slice(stream.data, x_BTD.astype(stream.data.dtype), (zero, start, zero))
        return stream.replace(data=data)
    q, s = quantize(x_BTD, stream.kind, stream.qblock, check_finite=False)
    data = lax.dynamic_update_slice(stream.data, q, (zero, start, zero))
    scale = lax.dynamic_update_slice(stream.scale, s, (zero, start, zero))
    ring = stream.ring
    if stream.residual > 0:
        # Only the newest min(T, R) tokens can still be in the window; they map to distinct
        # slots, so the scatter has no duplicate indices (and no order-dependent result).
        n = min(T, stream.residual)
        slots = (start + (T - n) + jnp.arange(n, dtype=jnp.int32)) % stream.residual
        ring = ring.at[:, slots].set(x_BTD[:, T - n:].astype(jnp.float16), unique_indices=True)
    return stream.replace(data=data, scale=scale, ring=ring)


def read(stream: StreamCache, start: Any, size: int, length: Any, window: bool = True) -> jax.Array:
    """float32 (B, size, dim) for positions start..start+size-1 of a cache holding `length` tokens.

    Only this slice is dequantized. Positions in the residual window (length-R <= p < length) come
    from the fp16 ring, unless `window=False` (the caller reads those from `read_window` instead).
    `start`/`length` may be traced, `size` is static; the caller guarantees start + size <= max_len.
    """
    B = stream.data.shape[0]
    start = jnp.asarray(start, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    if not stream.quantized:
        return lax.dynamic_slice(stream.data, (zero, start, zero), (B, size, stream.dim)).astype(jnp.float32)
    q = lax.dynamic_slice(stream.data, (zero, start, zero), (B, size, stream.data.shape[2]))
    s = lax.dynamic_slice(stream.scale, (zero, start, zero), (B, size, stream.scale.shape[2]))
    out = dequantize(q, s, stream.kind, stream.dim, stream.qblock)
    if stream.residual > 0 and window:
        length = jnp.asarray(length, jnp.int32)
        p = start + jnp.arange(size, dtype=jnp.int32)
        in_window = (p >= length - stream.residual) & (p < length)
        exact = jnp.take(stream.ring, p % stream.residual, axis=1).astype(jnp.float32)
        out = jnp.where(in_window[None, :, None], exact, out)
    return out


def read_split(stream: StreamCache, start: Any, size: int) -> tuple[jax.Array, ...]:
    """The stored values of positions start..start+size-1 (no residual window) as float32 parts
    whose channels interleave: part i of S holds channels i, i+S, ... of the zero-padded channels.

    4-bit kinds give S = 2, the high- and low-nibble channels (even, odd), so no interleaving pass
    runs: a consumer that sums over channels (scores) or maps them back afterwards (P @ V on a
    few queries) takes the parts as they are. Other kinds: one part, `read(window=False)`.
    """
    if stream.kind not in FOUR_BIT_KINDS:
        return (read(stream, start, size, start, window=False),)
    B = stream.data.shape[0]
    start = jnp.asarray(start, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    q = lax.dynamic_slice(stream.data, (zero, start, zero), (B, size, stream.data.shape[2]))
    s = lax.dynamic_slice(stream.scale, (zero, start, zero), (B, size, stream.scale.shape[2]))
    return _dequantize_split(q, s, stream.kind, stream.dim, stream.qblock)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _dequantize_split(q: jax.Array, scale: jax.Array, kind: str, dim: int, qblock: int) -> tuple[jax.Array, ...]:
    qb, pad_dim, nb = quant_layout(kind, dim, qblock)
    lead = q.shape[:-1]
    sc = scale.astype(jnp.float32)[..., None]
    parts = []
    for u in (q >> 4, q & 15):  # byte j: channels 2j and 2j+1, both in block j // (qb / 2)
        v = u.astype(jnp.float32) - 8.0 if kind == "q4_0" else _nf4_values(u)
        if kind == "nf4":  # materialised: fused into the score dot, the select tree ran slower
            v = lax.optimization_barrier(v)
        parts.append((v.reshape(*lead, nb, qb // 2) * sc).reshape(*lead, pad_dim // 2))
    return tuple(parts)


def window_positions(residual: int, length: Any) -> jax.Array:
    """int32 (R,): the position held in ring slot j of a cache holding `length` tokens, i.e. the
    p in [length-R, length) with p % R == j (negative: the slot holds no token yet)."""
    base = jnp.asarray(length, jnp.int32) - residual
    return base + (jnp.arange(residual, dtype=jnp.int32) - base) % residual


def read_window(stream: StreamCache, residual: int, length: Any) -> jax.Array:
    """float32 (B, R, dim): the newest R positions in ring-slot order (`window_positions`), exact:
    the fp16 ring of a quantized stream, or the stored values of an fp16/fp32 stream. Decode reads
    these once instead of gathering the ring into every block (4x less per-block work)."""
    if stream.residual > 0:
        if stream.residual != residual:
            raise ValueError(f"window of {residual} read from a ring of {stream.residual}")
        return stream.ring.astype(jnp.float32)
    if stream.quantized:
        raise ValueError("a quantized stream without a residual ring has no exact window")
    p = jnp.maximum(window_positions(residual, length), 0)
    return jnp.take(stream.data, p, axis=1).astype(jnp.float32)
