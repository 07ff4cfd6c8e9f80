"""Fused decode attention over the quantized KV cache in Pallas (issue #18; `--kv-fused pallas`).

One kernel reads a layer's stored cache blocks as they are (q8_0 codes, packed q4_0/nf4 nibbles
and their fp16 scales, fp16/fp32 streams, the fp16 residual ring), dequantizes them in the kernel
and runs an online softmax over the key axis, split flash-decoding style: the grid is
(batch, kv-head, split), each program covers `split_size` keys of the quantized store in blocks
of `block` keys (the last grid split is the residual window, read straight from the ring) and
writes a partial (max, denominator, output); a second pass in plain jnp merges the partials with
the null key's term (the same online-softmax combination `cached_attend` seeds with it).

Same semantics as `jax_model.cached_attention.cached_attend` (same arguments; results equal up to
float summation order): decoupled keys are the per-stream parts concatenated in `key_names` order
(the model's scales are already folded into the query), gqa groups G = H / K query heads per kv
head, rotated (`+rot`) key streams are scored with rotated queries (`rotate_queries`, outside the
kernel, like the reference), the null key scores against the unrotated query.

Layout in the kernel: a program reads only its kv-head's channels. For a quantized stream that
needs the head to own whole quant blocks (head dim % qb == 0) or to sit inside one block
(qb % head dim == 0, the block's one scale shared); 4-bit streams also need an even head dim.
4-bit codes are never interleaved back: the high nibbles (even channels) and low nibbles (odd
channels) are scored against the query's even / odd channels, and P @ V of a 4-bit value stream
is written as [even | odd] channel halves that the merge pass interleaves. `unsupported_reason`
says why a layer cannot run here, so the caller falls back to `cached_attend`.

On a GPU `pl.pallas_call` lowers through Triton (the default Pallas GPU backend of jax 0.10;
Mosaic GPU is opt-in and wants `plgpu.kernel`); Triton needs power-of-two tile sizes, which
`unsupported_reason(..., interpret=False)` checks. On a CPU it runs with `interpret=True`.

Who uses it: the decode functions (`decode`, `sampling`, `evaluate`) take `kv_fused` ('none' |
'pallas' | 'pallas-interpret') and hand `cache_attention(kv_fused)` to `DBAModel.forward_cached`
as its `cache_attend`; `resolve_kv_fused` turns `--kv-fused` into that mode. The model itself
never imports this module.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dba.kvspec import FOUR_BIT_KINDS, NF4_LEVELS
from jax_model import kvcache as kvc
from jax_model.cached_attention import cached_attend, rotate_queries
from jax_model.layers import NEG_INF, group_queries, null_scores

FUSED_KINDS = frozenset({"fp32", "fp16", "q8_0", "q4_0", "nf4"})
DEFAULT_BLOCK = 256  # keys per inner step (128-512 suits an H100)
DEFAULT_SPLITS = 16  # target number of key splits over max_len (flash-decoding parallelism)
MAX_QUERIES = 16  # queries per row the kernel takes (decode: 1); longer prompt chunks use cached_attend
DOT_MIN_ROWS = 16  # fewer query rows per kv head (G*T) than this: broadcast-multiply-sum, not a dot
KV_FUSED_MODES = ("none", "pallas", "pallas-interpret")  # the `kv_fused` modes (`cache_attention`)

_NF4 = [np.float32(v) for v in NF4_LEVELS]


def pallas_available(interpret: bool) -> bool:
    """Whether the kernel can run here: always in the interpreter (any backend, CPU included) when
    Pallas imports; compiled only on a GPU with Pallas' Triton backend."""
    if interpret:
        return True
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _head_quant(s: kvc.StreamCache, d: int) -> tuple[int, int] | None:
    """(scale columns per head, channels per scale) of a quantized stream's head of d channels,
    or None when a head neither owns whole quant blocks nor sits inside one."""
    qb = s.qblock
    if d % qb == 0:
        return d // qb, qb
    if qb % d == 0:
        return 1, d
    return None


def unsupported_reason(streams: dict[str, kvc.StreamCache], key_names: tuple[str, ...], n_kv_head: int,
                       n_queries: int = 1, n_head: int | None = None, *, interpret: bool = True) -> str | None:
    """None when `fused_cached_attend` runs this layer, else a one-line reason (the caller then
    uses `cached_attend`). `n_queries`: T per row; `n_head`: query heads (for the GPU tile check);
    `interpret=False` adds the compiled (Triton) constraints: power-of-two tiles."""
    if n_queries > MAX_QUERIES:
        return f"{n_queries} queries per row (the kernel takes up to {MAX_QUERIES}: decode)"
    if "v" not in streams or any(k not in streams for k in key_names):
        return f"streams {sorted(streams)} lack one of {key_names + ('v',)}"
    rings = {s.residual for s in streams.values() if s.residual > 0}
    if len(rings) > 1:
        return f"streams of one layer have different residual windows: {sorted(rings)}"
    r = rings.pop() if rings else 0
    for name in (*key_names, "v"):
        s = streams[name]
        if s.kind not in FUSED_KINDS:
            return f"stream {name}: kind {s.kind} has no fused kernel (fused: {', '.join(sorted(FUSED_KINDS))})"
        if s.dim % n_kv_head:
            return f"stream {name}: width {s.dim} is not a multiple of {n_kv_head} kv heads"
        d = s.dim // n_kv_head
        if s.quantized:
            if _head_quant(s, d) is None:
                return (f"stream {name}: {s.kind} blocks of {s.qblock} channels straddle its heads of {d} "
                        f"(the kernel needs head dim % qblock == 0 or qblock % head dim == 0)")
            if s.kind in FOUR_BIT_KINDS and d % 2:
                return f"stream {name}: {s.kind} with an odd head dim {d}"
            if s.residual == 0 and r:
                return f"stream {name}: quantized without the layer's window of {r}"
        if not interpret:
            tiles = [d, d // 2] if s.kind in FOUR_BIT_KINDS else [d]
            if s.quantized:
                tiles.append(_head_quant(s, d)[0])
            if not all(_pow2(x) for x in tiles):
                return f"stream {name}: tile sizes {tiles} are not powers of two (Triton)"
    if not interpret:
        rows = n_queries * ((n_head or n_kv_head) // n_kv_head)
        if not _pow2(rows) or (r and not _pow2(r)):
            return f"queries per kv head {rows} or window {r} not a power of two (Triton)"
    return None


def supports(streams: dict[str, kvc.StreamCache], key_names: tuple[str, ...], n_kv_head: int,
             n_queries: int = 1, n_head: int | None = None, *, interpret: bool = True) -> bool:
    return unsupported_reason(streams, key_names, n_kv_head, n_queries, n_head, interpret=interpret) is None


# ---- in-kernel dequantization -------------------------------------------------------------

def _nf4_values(u: jax.Array) -> jax.Array:
    level = [jnp.float32(v) for v in _NF4]
    for bit in range(4):
        on = ((u >> bit) & 1) == 1
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _dequant(kind: str, codes: jax.Array, scale: jax.Array | None, nbh: int, qbh: int) -> list[jax.Array]:
    """Float32 parts of one head's tile: [values] (fp/q8_0) or [even channels, odd channels]
    (4-bit, from the high / low nibbles). codes (n, width), scale (n, nbh)."""
    if scale is None:
        return [codes.astype(jnp.float32)]
    n = codes.shape[0]
    sc = scale.astype(jnp.float32)[:, :, None]
    if kind == "q8_0":
        return [(codes.astype(jnp.float32).reshape(n, nbh, qbh) * sc).reshape(n, nbh * qbh)]
    c = codes.astype(jnp.int32)
    parts = []
    for u in (c >> 4, c & 15):
        v = u.astype(jnp.float32) - 8.0 if kind == "q4_0" else _nf4_values(u)
        parts.append((v.reshape(n, nbh, qbh // 2) * sc).reshape(n, nbh * qbh // 2))
    return parts


# ---- the kernel -----------------------------------------------------------------------------

def _kernel(*refs, layout, v_layout, n_store, split_size, blk, max_len, r, t, gt, q_dtype, small):
    """One (batch, kv-head, split) program. `layout`: per key stream (kind, nbh, qbh, quantized);
    refs: pos, per key stream [q natural, (q even, q odd if 4-bit)], per stream of keys + v:
    [data, (scale)], then [window tile] per stream when r, then outputs m, l, acc. `small`: G*T
    below DOT_MIN_ROWS (Triton's dot wants >= 16 rows), so products are multiplied and reduced."""
    it = iter(refs)
    pos_ref = next(it)
    q_refs = []
    for kind, *_ in layout:
        q_refs.append([next(it)] + ([next(it), next(it)] if kind in FOUR_BIT_KINDS else []))
    store_refs = []
    for kind, _, _, quant in (*layout, v_layout):
        store_refs.append((next(it), next(it) if quant else None))
    win_refs = [next(it) for _ in range(len(layout) + 1)] if r else []
    m_ref, l_ref, acc_ref = next(it), next(it), next(it)

    q_start, length = pos_ref[0], pos_ref[1]
    split = pl.program_id(2)
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (gt, 1), 0) % t  # (GT, 1): rows are (g, t)
    store_end = length - r
    dv_parts = 2 if v_layout[0] in FOUR_BIT_KINDS else 1
    dv = acc_ref.shape[-1]


    def dot_qk(q, k):  # (GT, w) x (n, w) -> (GT, n) fp32; k rounded to q's dtype as cached_attend does
        k = k.astype(q_dtype)
        if small:
            return jnp.sum(q.astype(jnp.float32)[:, None, :] * k.astype(jnp.float32)[None, :, :], axis=-1)
        return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def dot_pv(p, v):  # (GT, n) x (n, w) -> (GT, w) fp32
        if small:
            return jnp.sum(p[:, :, None] * v[None, :, :], axis=1)
        return jnp.dot(p, v, preferred_element_type=jnp.float32)

    def update(carry, k_parts, q_parts, v_parts, k_pos, valid):
        m, l, accs = carry
        s = 0.0
        for qp, kp in zip(q_parts, k_parts):
            s = s + dot_qk(qp, kp)
        mask = valid[None, :] & (k_pos[None, :] <= q_pos)
        s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(-1, keepdims=True))
        corr = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        l = l * corr + p.sum(-1, keepdims=True)
        accs = [a * corr + dot_pv(p, jnp.where(valid[:, None], v, 0.0)) for a, v in zip(accs, v_parts)]
        return m_new, l, accs

    def init(n_parts):
        return (jnp.full((gt, 1), NEG_INF, jnp.float32), jnp.zeros((gt, 1), jnp.float32),
                [jnp.zeros((gt, dv // n_parts), jnp.float32)] * n_parts)

    def store_q():
        return [qr[1:] if len(qr) == 3 else qr for qr in q_refs]

    @pl.when(split < n_store)
    def _store():
        base = split * split_size
        n_blocks = jnp.clip((store_end - base + blk - 1) // blk, 0, split_size // blk)
        q_parts = [x[...] for qr in store_q() for x in qr]

        def body(i, carry):
            nominal = base + i * blk
            start = jnp.minimum(nominal, max_len - blk)  # the last block may overlap the previous one
            tiles = []
            for (kind, nbh, qbh, _), (d_ref, s_ref) in zip((*layout, v_layout), store_refs):
                codes = d_ref[pl.ds(start, blk), :]
                scale = None if s_ref is None else s_ref[pl.ds(start, blk), :]
                tiles.append(_dequant(kind, codes, scale, nbh, qbh))
            k_pos = start + lax.broadcasted_iota(jnp.int32, (blk,), 0)
            valid = (k_pos >= nominal) & (k_pos < store_end)
            k_parts = [p for tile in tiles[:-1] for p in tile]
            return update(carry, k_parts, q_parts, tiles[-1], k_pos, valid)

        m, l, accs = lax.fori_loop(0, n_blocks, body, init(dv_parts))
        m_ref[...], l_ref[...] = m, l
        for i, a in enumerate(accs):  # 4-bit V: [even | odd] halves, interleaved by the merge
            acc_ref[:, i * (dv // dv_parts):(i + 1) * (dv // dv_parts)] = a

    if r:
        @pl.when(split == n_store)
        def _window():
            base = length - r
            slot = lax.broadcasted_iota(jnp.int32, (r,), 0)
            w_pos = base + (slot - base) % r  # kvcache.window_positions
            tiles = [w[...].astype(jnp.float32) for w in win_refs]
            q_parts = [qr[0][...] for qr in q_refs]
            m, l, accs = update(init(1), tiles[:-1], q_parts, tiles[-1:], w_pos, w_pos >= 0)
            m_ref[...], l_ref[...], acc_ref[...] = m, l, accs[0]


# ---- the entry point --------------------------------------------------------------------------

def _split_even_odd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x[..., 0::2], x[..., 1::2]


def fused_cached_attend(q_BHTD: jax.Array, streams: dict[str, kvc.StreamCache], q_start: jax.Array,
                        length: jax.Array, null_kv: tuple[jax.Array, jax.Array] | None, *, n_kv_head: int,
                        key_names: tuple[str, ...], decode_block: int = DEFAULT_BLOCK, interpret: bool = False,
                        split_size: int | None = None) -> jax.Array:
    """`cached_attend` (same arguments, same result up to summation order) as one Pallas kernel
    plus a jnp merge of its key splits. `decode_block`: keys per inner step (clipped to max_len);
    `split_size`: keys per grid split (a multiple of the block; default: about DEFAULT_SPLITS
    splits over max_len). Raises ValueError for a layer `unsupported_reason` refuses."""
    b, h, t, _ = q_BHTD.shape
    n_kv = n_kv_head
    g = h // n_kv
    gt = g * t
    reason = unsupported_reason(streams, key_names, n_kv, t, h, interpret=interpret)
    if reason:
        raise ValueError(f"fused decode attention: {reason}")
    max_len = next(iter(streams.values())).max_len
    blk = max(1, min(decode_block, max_len))
    n_blocks = -(-max_len // blk)
    if split_size is None:
        split_size = blk * max(1, -(-n_blocks // DEFAULT_SPLITS))
    if split_size % blk:
        raise ValueError(f"split_size {split_size} is not a multiple of the block {blk}")
    n_store = -(-max_len // split_size)
    rings = {s.residual for s in streams.values() if s.residual > 0}
    r = rings.pop() if rings else 0
    n_splits = n_store + (1 if r else 0)
    grid = (b, n_kv, n_splits)

    q = group_queries(q_BHTD, n_kv)
    q_rot = rotate_queries(q_BHTD, streams, key_names, n_kv)
    q_keys = q if q_rot is q_BHTD else group_queries(q_rot, n_kv)
    q_keys = q_keys.reshape(b, n_kv, gt, -1)

    def q_spec(w):
        return pl.BlockSpec((pl.squeezed, pl.squeezed, gt, w), lambda bi, ki, si: (bi, ki, 0, 0))

    args, specs, layout = [jnp.stack([jnp.asarray(q_start, jnp.int32), jnp.asarray(length, jnp.int32)])], [], []
    specs.append(pl.BlockSpec((2,), lambda bi, ki, si: (0,)))
    at = 0
    for name in key_names:
        s = streams[name]
        d = s.dim // n_kv
        qs = q_keys[..., at:at + d]
        at += d
        parts = [qs] + (list(_split_even_odd(qs)) if s.kind in FOUR_BIT_KINDS else [])
        args += parts
        specs += [q_spec(x.shape[-1]) for x in parts]
    for name in (*key_names, "v"):
        s = streams[name]
        d = s.dim // n_kv
        nbh, qbh = _head_quant(s, d) if s.quantized else (0, 0)
        if name != "v":
            layout.append((s.kind, nbh, qbh, s.quantized))
        width = d // 2 if s.kind in FOUR_BIT_KINDS else d
        args.append(s.data)
        specs.append(pl.BlockSpec((pl.squeezed, max_len, width), lambda bi, ki, si: (bi, 0, ki)))
        if s.quantized:
            per = max(1, s.qblock // d)  # heads sharing one scale column
            args.append(s.scale)
            specs.append(pl.BlockSpec((pl.squeezed, max_len, nbh),
                                      lambda bi, ki, si, per=per: (bi, 0, ki // per)))
    sv = streams["v"]
    v_layout = (sv.kind, *(_head_quant(sv, sv.dim // n_kv) if sv.quantized else (0, 0)), sv.quantized)
    if r:
        for name in (*key_names, "v"):
            s = streams[name]
            d = s.dim // n_kv
            win = kvc.read_window(s, r, length) if s.residual == 0 else s.ring  # fp16/fp32 streams: O(r) gather
            args.append(win)
            specs.append(pl.BlockSpec((pl.squeezed, r, d), lambda bi, ki, si: (bi, 0, ki)))

    dv = streams["v"].dim // n_kv
    out_shape = (jax.ShapeDtypeStruct((b, n_kv, n_splits, gt, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, n_kv, n_splits, gt, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, n_kv, n_splits, gt, dv), jnp.float32))
    out_specs = (pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, gt, 1), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                 pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, gt, 1), lambda bi, ki, si: (bi, ki, si, 0, 0)),
                 pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, gt, dv), lambda bi, ki, si: (bi, ki, si, 0, 0)))
    kernel = partial(_kernel, layout=tuple(layout), v_layout=v_layout, n_store=n_store, split_size=split_size,
                     blk=blk, max_len=max_len, r=r, t=t, gt=gt, q_dtype=q_keys.dtype,
                     small=gt < DOT_MIN_ROWS)
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt
        extra["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=2)
    m, l, acc = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=specs, out_specs=out_specs,
                               interpret=interpret, name="dba_fused_decode", **extra)(*args)

    if streams["v"].kind in FOUR_BIT_KINDS:  # store splits hold [even | odd] channel halves
        st = acc[:, :, :n_store].reshape(b, n_kv, n_store, gt, 2, dv // 2)
        st = jnp.swapaxes(st, -1, -2).reshape(b, n_kv, n_store, gt, dv)
        acc = jnp.concatenate([st, acc[:, :, n_store:]], axis=2)
    return _merge(m[..., 0], l[..., 0], acc, q, null_kv, (b, h, t, dv), q_BHTD.dtype)


def _merge(m, l, acc, q, null_kv, shape, dtype):
    """Combine the splits' (max, denominator, output) (B, K, S, GT[, Dv]) and the null key term."""
    b, n_kv, _, gt = m.shape
    mx = m.max(axis=2)
    if null_kv is not None:
        k_null, v_null = null_kv
        g = q.shape[2]
        m0 = null_scores(q, k_null.reshape(n_kv, g, -1)).reshape(b, n_kv, gt)
        mx = jnp.maximum(mx, m0)
    w = jnp.exp(m - mx[:, :, None])
    den = (l * w).sum(axis=2)
    out = (acc * w[..., None]).sum(axis=2)
    if null_kv is not None:
        w0 = jnp.exp(m0 - mx)
        dv = acc.shape[-1]
        vn = jnp.broadcast_to(v_null.reshape(n_kv, g, 1, dv).astype(jnp.float32), (n_kv, g, gt // g, dv))
        den = den + w0
        out = out + w0[..., None] * vn.reshape(n_kv, gt, dv)[None]
    return (out / den[..., None]).reshape(shape).astype(dtype)



# ---- `kv_fused`: the decode modules' choice of the attention over the cache -------------------

_warned: set[str] = set()


def decode_attend(kv_fused: str, q_BHTD: jax.Array, streams: dict[str, kvc.StreamCache], q_start: jax.Array,
                  length: jax.Array, null_kv: tuple[jax.Array, jax.Array] | None, *, n_kv_head: int,
                  key_names: tuple[str, ...], decode_block: int) -> jax.Array:
    """`cached_attend`, or this kernel when `kv_fused` names it and it supports the layer (else a
    one-time warning naming the reason, and `cached_attend`)."""
    if kv_fused in ("pallas", "pallas-interpret"):
        interpret = kv_fused == "pallas-interpret"
        _, h, t, _ = q_BHTD.shape
        reason = unsupported_reason(streams, key_names, n_kv_head, t, h, interpret=interpret)
        if reason is None and not pallas_available(interpret):
            reason = "Pallas cannot compile here (no GPU): use pallas-interpret"
        if reason is None:
            return fused_cached_attend(q_BHTD, streams, q_start, length, null_kv, n_kv_head=n_kv_head,
                                       key_names=key_names, decode_block=min(decode_block, DEFAULT_BLOCK),
                                       interpret=interpret)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"--kv-fused {kv_fused}: falling back to cached attention: {reason}", stacklevel=2)
    return cached_attend(q_BHTD, streams, q_start, length, null_kv, n_kv_head=n_kv_head, key_names=key_names,
                         decode_block=decode_block)


@functools.cache
def cache_attention(kv_fused: str = "none") -> Callable[..., jax.Array]:
    """The attention over a layer's cache that the mode `kv_fused` names, with `cached_attend`'s
    signature (what `DBAModel.forward_cached` takes as `cache_attend`): `cached_attend` itself for
    "none"; for "pallas" (compiled: a GPU) and "pallas-interpret" (the Pallas interpreter, any
    backend; slow, for checks) this kernel, falling back to `cached_attend` with one warning per
    reason on a layer it cannot take. Memoised: a mode always gives the same function, so the
    jitted decode functions, which take it as a static argument, compile once per mode."""
    if kv_fused not in KV_FUSED_MODES:
        raise ValueError(f"kv_fused {kv_fused!r}: expected one of {', '.join(KV_FUSED_MODES)}")
    return cached_attend if kv_fused == "none" else partial(decode_attend, kv_fused)


def resolve_kv_fused(choice: str) -> tuple[str, str]:
    """`--kv-fused choice` (dba/fused.py) here: (the mode the decode functions take as `kv_fused`:
    the Pallas kernel when the choice names it, compiled on a GPU, interpreted when asked for on a
    CPU, else "none"; what runs, for the info line: 'none', 'pallas', 'pallas (interpreted)').
    An explicit kernel that cannot run here is a one-line UserError; `auto` then means none."""
    from dba.errors import UserError
    from dba.fused import resolve_fused

    kernel, interpret = resolve_fused(choice, "jax", jax.default_backend() == "gpu")
    if kernel == "none":
        return "none", "none"
    if not pallas_available(interpret):
        if choice == "auto":
            return "none", "none"
        raise UserError(f"--kv-fused {choice}: Pallas cannot compile its GPU kernel here", 1)
    return ("pallas-interpret", "pallas (interpreted)") if interpret else ("pallas", "pallas")
