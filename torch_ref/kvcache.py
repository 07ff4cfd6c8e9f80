"""Quantized KV cache for the PyTorch reference (SPEC §5): quantize/dequantize and the cache.

Mirrors `jax_model/kvcache.py` function for function: same names, same storage layout, same
bytes. Geometry comes from `dba.kvspec`. Tensors are written in place (`write` mutates and
returns the stream). MPS-safe: nothing here uses float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dba.kvspec import (FP16_MAX, NF4_LEVELS, QMAX, KVPolicy, StreamSpec, non_finite_message,
                        quant_layout, require_quant, storage_layout, stream_spec)
from dba.rotation import rotation_dims
from torch_ref.layers import hadamard

_NF4 = torch.tensor(NF4_LEVELS, dtype=torch.float32)


def quantize(x: torch.Tensor, kind: str, qblock: int, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., dim) float -> (q, scale): q int8 (..., pad_dim) for q8_0, packed uint8
    (..., pad_dim//2) for q4_0/nf4; scale float16 (..., n_blocks).

    SPEC §5, with the block scale capped at 65504 (the largest fp16) so any finite input
    dequantizes to finite values: a block past that range saturates. With `check_finite`, NaN/Inf
    input raises a one-line ValueError counting them (`write` skips the check: it would sync the device)."""
    require_quant(kind)
    x = x.to(torch.float32)
    dim = x.shape[-1]
    qb, pad_dim, nb = quant_layout(kind, dim, qblock)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(non_finite_message(x.detach().float().cpu().numpy()))
    lead = x.shape[:-1]
    if pad_dim != dim:  # zero channels never raise a block's absmax and quantize to code 0
        x = F.pad(x, (0, pad_dim - dim))
    xb = x.reshape(*lead, nb, qb)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    # Divide by tensors, not Python scalars: CUDA turns `t / scalar` into a multiply by the
    # reciprocal, which can differ from the true quotient in the last bit (and so from JAX).
    # Capped at the largest fp16 so the stored scale is the one the codes were computed with: a
    # block whose absmax/qmax exceeds 65504 saturates instead of storing an inf scale (which
    # dequantizes to inf, and 0 * inf = NaN). Same as jax_model/kvcache.py.
    scale = torch.clamp(amax / torch.full_like(amax, QMAX[kind]), 1e-8, FP16_MAX)  # fp32
    y = xb / scale  # divide by the fp32 scale, not the fp16 one that is stored
    if kind == "q8_0":
        q = torch.clamp(torch.round(y), -127, 127).to(torch.int8).reshape(*lead, pad_dim)
    else:
        if kind == "q4_0":
            u = (torch.clamp(torch.round(y), -8, 7) + 8).to(torch.int32)
        else:
            u = _nf4_index(torch.clamp(y, -1.0, 1.0))
        u = u.reshape(*lead, pad_dim // 2, 2)
        q = (u[..., 0] * 16 + u[..., 1]).to(torch.uint8)  # even channel in the high nibble
    return q, scale.to(torch.float16).reshape(*lead, nb)


def _nf4_index(y: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level, first index on ties (like argmin), without building a
    (..., 16) distance tensor: a running minimum over the 16 levels."""
    levels = _NF4.tolist()
    best = torch.zeros(y.shape, dtype=torch.int32, device=y.device)
    best_d = (y - levels[0]).abs()
    for i in range(1, 16):
        d = (y - levels[i]).abs()
        closer = d < best_d  # strict: an equal distance keeps the earlier level
        best = torch.where(closer, torch.full_like(best, i), best)
        best_d = torch.where(closer, d, best_d)
    return best


def _pair_table(kind: str, device) -> torch.Tensor:
    """(256,) int64 whose element b holds, as two float32, the values a packed q4_0/nf4 byte b
    stands for (high nibble first, as `quantize` packs them). Decode reads every cached block
    each token: one index_select of 8-byte rows, reinterpreted as float32 pairs, replaces shift,
    mask, stack and two conversions (and is ~9x faster than a float (256, 2) gather on a CPU)."""
    key = (kind, str(device))
    table = _PAIR_TABLES.get(key)
    if table is None:
        u = torch.arange(256, dtype=torch.int64)
        codes = torch.stack([u >> 4, u & 15], dim=-1)
        pairs = (codes - 8).to(torch.float32) if kind == "q4_0" else _NF4[codes]
        table = _PAIR_TABLES[key] = pairs.contiguous().view(torch.int64).reshape(256).to(device)
    return table


_PAIR_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def dequantize(q: torch.Tensor, scale: torch.Tensor, kind: str, dim: int, qblock: int) -> torch.Tensor:
    """Inverse of `quantize`: float32 (..., dim) = code * float32(stored fp16 scale)."""
    require_quant(kind)
    qb, pad_dim, nb = quant_layout(kind, dim, qblock)
    lead = q.shape[:-1]
    if kind == "q8_0":
        v = q.to(torch.float32)
    elif torch.compiler.is_compiling():
        # Under torch.compile the nibble arithmetic fuses into whatever reads the values; the
        # table's int64 gather does not (it is materialized, then reinterpreted).
        u = q.to(torch.int32)
        codes = torch.stack([u >> 4, u & 15], dim=-1)
        v = (codes - 8).to(torch.float32) if kind == "q4_0" else _NF4.to(q.device)[codes]
    else:
        v = _pair_table(kind, q.device).index_select(0, q.reshape(-1).to(torch.int64)).view(torch.float32)
    out = v.view(*lead, nb, qb) * scale.to(torch.float32).unsqueeze(-1)
    out = out.view(*lead, pad_dim)
    return out if pad_dim == dim else out[..., :dim]


# ---- the cache ---------------------------------------------------------------------------

@dataclass
class StreamCache:
    """One cached sequence tensor of a layer (same layout as jax_model.kvcache.StreamCache): the
    tensors `dba.kvspec.storage_layout` names for its `spec` (data, scale or None, ring or None;
    the ring holds position p in slot p % residual). `rot_dim`: for a rotated key stream
    (`spec.rotated`), the head dim its Hadamard rotation acts on; 0 otherwise."""

    data: torch.Tensor
    scale: torch.Tensor | None
    ring: torch.Tensor | None
    spec: StreamSpec
    rot_dim: int = 0

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


@dataclass
class LayerCache:
    """One layer's streams (name -> StreamCache, written in place) and `pos`, the tokens they
    hold (a Python int: no device sync): what `Attention` takes and returns."""

    streams: dict[str, StreamCache]
    pos: int

    @property
    def max_len(self) -> int:
        return next(iter(self.streams.values())).max_len


@dataclass
class Cache:
    """Per-layer dicts of stream caches plus the number of cached tokens `pos` (a Python int)."""

    layers: list[dict[str, StreamCache]]
    pos: int = 0

    @property
    def max_len(self) -> int:
        return next(iter(self.layers[0].values())).max_len

    def layer(self, i: int) -> LayerCache:
        """Layer i's streams at the cache's position."""
        return LayerCache(self.layers[i], self.pos)

    def with_layers(self, layers: Sequence[LayerCache]) -> Cache:
        """This cache, updated in place to hold these layers (all at one position); returns it."""
        self.layers = [l.streams for l in layers]
        self.pos = layers[0].pos
        return self


def _check_rot_dim(spec: StreamSpec, rot_dim: int) -> None:
    if spec.rotated != (rot_dim > 0) or (rot_dim and (rot_dim & (rot_dim - 1) or spec.dim % rot_dim)):
        raise ValueError(f"stream {spec.name}: rot_dim={rot_dim} for a {'rotated' if spec.rotated else 'plain'} "
                         f"stream of width {spec.dim} (a rotated stream needs its power-of-two head dim)")


def alloc_stream(spec: StreamSpec, batch: int, max_len: int, device: Any = None, rot_dim: int = 0) -> StreamCache:
    """Zeroed storage for `spec` (its ring already clipped to max_len); `rot_dim` the head dim of a
    rotated stream (`dba.rotation.rotation_dims`), 0 for the others."""
    _check_rot_dim(spec, rot_dim)
    tensors = {k: None if a is None else torch.zeros(a[0], dtype=getattr(torch, a[1]), device=device)
               for k, a in storage_layout(spec, batch, max_len).items()}
    return StreamCache(tensors["data"], tensors["scale"], tensors["ring"], spec, rot_dim)


def init_stream(kind: str, dim: int, qblock: int, residual: int, batch: int, max_len: int,
                name: str = "", device: Any = None) -> StreamCache:
    """Zeroed storage for one stream; `residual` is the requested window (clipped to max_len)."""
    return alloc_stream(stream_spec(name, kind, dim, qblock, residual, max_len), batch, max_len, device)


def init_cache(cfg: Any, policy: KVPolicy | None, batch: int, max_len: int, device: Any = None) -> Cache:
    """A preallocated cache for `cfg` under `policy` (None: fp16) with room for max_len tokens."""
    policy = KVPolicy() if policy is None else policy
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"batch and max_len must be positive, got batch={batch}, max_len={max_len}")
    specs = {name: policy.stream(name, cfg, max_len=max_len) for name in cfg.kv_streams()}
    rot = rotation_dims(cfg, policy)
    layers = [{name: alloc_stream(spec, batch, max_len, device, rot.get(name, 0)) for name, spec in specs.items()}
              for _ in range(cfg.n_layer)]
    return Cache(layers, 0)


def nbytes(cache: Cache | StreamCache) -> int:
    """Bytes really allocated by the storage, scale and ring tensors (pos not counted)."""
    streams = [cache] if isinstance(cache, StreamCache) else [s for l in cache.layers for s in l.values()]
    return int(sum(a.numel() * a.element_size() for s in streams for a in (s.data, s.scale, s.ring)
                   if a is not None))


def write(stream: StreamCache, x_BTD: torch.Tensor, start: int | torch.Tensor) -> StreamCache:
    """Store T tokens at positions start..start+T-1, in place; returns the stream.

    The caller guarantees start + T <= max_len (checked here for an int start; a 0-d tensor start,
    the compiled decode step's, is one program for every position and is not read back). Values
    are not checked for NaN/Inf (a check would force a device sync per layer per token). A
    rotated stream stores H x per head (fp32 butterflies, before quantizing and before the fp16
    ring), as jax_model.kvcache.write.
    """
    if stream.rot_dim:
        x_BTD = hadamard(x_BTD.to(torch.float32), stream.rot_dim)
    T = x_BTD.shape[1]
    offsets = torch.arange(T, device=x_BTD.device)
    if torch.is_tensor(start):
        # indexed assignment (index_put_), which Inductor updates in place; index_copy_ was
        # functionalized into a copy of the whole cache tensor every step
        at = start.reshape(1) + offsets
    else:
        start = int(start)
        if start < 0 or start + T > stream.max_len:
            raise ValueError(f"write of {T} tokens at {start} overflows a cache of {stream.max_len}")
        at = slice(start, start + T)
    if not stream.quantized:
        stream.data[:, at] = x_BTD.to(stream.data.dtype)
        return stream
    q, s = quantize(x_BTD, stream.kind, stream.qblock, check_finite=False)
    stream.data[:, at] = q
    stream.scale[:, at] = s
    if stream.residual > 0:
        # Only the newest min(T, R) tokens can still be in the window; distinct slots.
        n = min(T, stream.residual)
        slots = (start + offsets[T - n:]) % stream.residual
        stream.ring[:, slots] = x_BTD[:, T - n:].to(torch.float16)
    return stream


def window_positions(residual: int, length: torch.Tensor) -> torch.Tensor:
    """int64 (R,): the position held in ring slot j of a cache holding `length` tokens (a 0-d
    tensor), i.e. the p in [length-R, length) with p % R == j (negative: the slot holds no token
    yet). As jax_model.kvcache.window_positions."""
    base = length - residual
    return base + (torch.arange(residual, device=length.device) - base) % residual


def read_window(stream: StreamCache, residual: int, length: torch.Tensor) -> torch.Tensor:
    """float32 (B, R, dim): the newest R positions in ring-slot order (`window_positions`), exact:
    the fp16 ring of a quantized stream, or the stored values of an fp16/fp32 stream (gathered).
    As jax_model.kvcache.read_window."""
    if stream.residual > 0:
        if stream.residual != residual:
            raise ValueError(f"window of {residual} read from a ring of {stream.residual}")
        return stream.ring.to(torch.float32)
    if stream.quantized:
        raise ValueError("a quantized stream without a residual ring has no exact window")
    p = torch.clamp(window_positions(residual, length), min=0)
    return stream.data.index_select(1, p).to(torch.float32)


def read_stored(stream: StreamCache, start: int, size: int) -> torch.Tensor:
    """float32 (B, size, dim): the stored values of positions start..start+size-1, dequantized,
    without the window (jax_model.kvcache.read(window=False))."""
    if not stream.quantized:
        return stream.data[:, start:start + size].to(torch.float32)
    return dequantize(stream.data[:, start:start + size], stream.scale[:, start:start + size],
                      stream.kind, stream.dim, stream.qblock)


def read(stream: StreamCache, start: int, size: int, length: int) -> torch.Tensor:
    """float32 (B, size, dim) for positions start..start+size-1 of a cache holding `length` tokens.

    Only this slice is dequantized; positions in the residual window (length-R <= p < length)
    come from the fp16 ring. The caller guarantees start + size <= max_len.
    """
    start, size, length = int(start), int(size), int(length)
    if start < 0 or start + size > stream.max_len:
        raise ValueError(f"read of {size} tokens at {start} overflows a cache of {stream.max_len}")
    out = read_stored(stream, start, size)
    if stream.quantized and stream.residual > 0:
        lo = max(start, length - stream.residual)
        hi = min(start + size, length)
        if hi > lo:  # positions lo..hi-1 sit in slots lo % R.. : one slice, or two where they wrap
            r = stream.residual
            first = min(hi - lo, r - lo % r)
            out[:, lo - start:lo - start + first] = stream.ring[:, lo % r:lo % r + first]
            if first < hi - lo:
                out[:, lo - start + first:hi - start] = stream.ring[:, :hi - lo - first]
    return out
