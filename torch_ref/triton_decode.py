"""Fused decode attention over the stored KV cache in Triton (issue #18; v29's `triton1pass` /
`triton2pass`): one kernel reads each cached stream's stored blocks directly (fp32/fp16 data, or
q8_0 / q4_0 / nf4 codes with their fp16 block scales, and the fp16 window ring for the newest
`residual` positions), dequantizes in registers, scores the query rows against the key streams
(per head the key streams' slices concatenated in `key_names` order, as `cached_attend` does; the
model's scaling is already in the query), adds the null key, and runs an online softmax (fp32
max, denominator and output) over the key axis.

- `one_pass`: a grid over (batch x kv-head); each program walks all keys and writes the output.
- `two_pass` (flash-decoding, split-K): pass 1 is a grid over (batch x kv-head, split), each
  program walking `chunk` keys and writing its partial max / denominator / unnormalised output;
  pass 2, a small kernel over (batch x kv-head), merges the splits.

The G = H/K query heads of a kv-head and the T queries of a row go through one program as G*T
rows (gqa without repeating K/V). Rotated key streams (`+rot`) are scored with rotated queries
(`rotate_queries`, torch ops on the few query rows); the null key against the unrotated query.

Entry points: `fused_attend` (same signature and result as `cached_attend`, plus `mode`),
`unsupported_reason` (None when the kernel can run these arguments, else why not: callers then
use `cached_attend`), `triton_available`; for the decode functions (`decode`, `sampling`,
`evaluate`, whose `kv_fused` names a mode) `cache_attention(kv_fused)`, the function
`DBAModel.forward_cached` takes as `cache_attend`, and `resolve_kv_fused` (`--kv-fused` -> that
mode). The model never imports this module. Triton is imported lazily: torch_ref imports and
works without it. The kernels are defined on first use, so `TRITON_INTERPRET=1` (read by
`triton.jit` when a kernel is decorated) must be set before the first call, not before import.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable

import torch

from dba.kvspec import NF4_LEVELS
from torch_ref import kvcache as kvc
from torch_ref.cached_attention import cached_attend, rotate_queries

MODES = ("auto", "one_pass", "two_pass")
# the `kv_fused` modes (v29's --kv-fused names) -> the kernel's mode; "none" is `cached_attend`.
KV_FUSED_MODES = {"none": None, "triton": "auto", "triton1pass": "one_pass", "triton2pass": "two_pass"}
_KIND_CODE = {"fp32": 0, "fp16": 1, "q8_0": 2, "q4_0": 3, "nf4": 4}
_MAX_ROWS = 64  # G*T query rows per program (decode: G, or a few queries per row)
_MAX_HEAD_DIM = 256


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001  # ImportError, or a broken install (missing libs)
        return False
    return True


def triton_available() -> bool:
    """True when triton imports and the kernel can run: on a CUDA device, or interpreted on the
    CPU with TRITON_INTERPRET=1."""
    return _triton_importable() and (torch.cuda.is_available() or _interpret())


def unsupported_reason(q_BHTD: torch.Tensor, streams: dict[str, kvc.StreamCache], *, n_kv_head: int,
                       key_names: tuple[str, ...]) -> str | None:
    """None when `fused_attend` can run these arguments, else a one-line reason (the caller
    falls back to `cached_attend`)."""
    if not _triton_importable():
        return "triton is not installed"
    dev = q_BHTD.device
    if dev.type == "cuda":
        if _interpret():
            return "TRITON_INTERPRET=1 runs the kernel on CPU tensors, but the cache is on cuda"
    elif dev.type == "cpu":
        if not _interpret():
            return "the cache is on the CPU: the Triton kernel runs there only interpreted (TRITON_INTERPRET=1)"
    else:
        return f"the Triton kernel needs a CUDA device (or the CPU interpreter), not {dev.type}"
    if not 1 <= len(key_names) <= 2 or "v" not in streams or any(k not in streams for k in key_names):
        return f"key streams {key_names} (the kernel takes one or two key streams and v)"
    b, h, t, dqk = q_BHTD.shape
    if n_kv_head <= 0 or h % n_kv_head:
        return f"{h} query heads over {n_kv_head} kv-heads"
    if (h // n_kv_head) * t > _MAX_ROWS:
        return f"{(h // n_kv_head) * t} query rows per kv-head (query heads per kv-head x queries) > {_MAX_ROWS}"
    dims = []
    for name in (*key_names, "v"):
        s = streams[name]
        if s.kind not in _KIND_CODE:
            return f"stream {name}: kind {s.kind}"
        if s.dim % n_kv_head:
            return f"stream {name}: width {s.dim} over {n_kv_head} kv-heads"
        if s.dim // n_kv_head > _MAX_HEAD_DIM:
            return f"stream {name}: head dim {s.dim // n_kv_head} > {_MAX_HEAD_DIM}"
        if s.data.device != dev or s.data.shape[0] != b:
            return f"stream {name}: on {s.data.device} with batch {s.data.shape[0]}, the query on {dev} with batch {b}"
        dims.append(s.dim // n_kv_head)
    if sum(dims[:-1]) != dqk:
        return f"query head dim {dqk} != key head dims {dims[:-1]}"
    return None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---- the kernels: plain functions here, `triton.jit`-decorated on first use (`_kernels`) -----
# The interpreter re-executes a kernel's source against the module's globals, so the kernels and
# their helper live at module level and `tl` / `_load_stream_jit` are bound here by `_kernels`.
tl = None
_load_stream_jit = None


def _load_stream(data, scale, ring, nf4, sdb, sdl, ssb, ssl, srb, srl, b, pos, pos_ok, ch, ch_ok,
                length, qb, res, KIND: tl.constexpr, HAS_RING: tl.constexpr):
    """float32 (BLOCK_N, BD) of stream channels `ch` at positions `pos` of batch row b."""
    msk = pos_ok[:, None] & ch_ok[None, :]
    row = b * sdb + pos[:, None].to(tl.int64) * sdl
    if KIND <= 1:  # fp32 / fp16
        x = tl.load(data + row + ch[None, :], mask=msk, other=0.0).to(tl.float32)
    else:
        sc = tl.load(scale + b * ssb + pos[:, None].to(tl.int64) * ssl + (ch // qb)[None, :], mask=msk,
                     other=0.0).to(tl.float32)
        if KIND == 2:  # q8_0
            code = tl.load(data + row + ch[None, :], mask=msk, other=0).to(tl.float32)
        else:  # packed 4-bit: even channel in the high nibble
            byte = tl.load(data + row + (ch // 2)[None, :], mask=msk, other=0).to(tl.int32)
            nib = tl.where((ch % 2 == 0)[None, :], byte >> 4, byte & 15)
            if KIND == 3:  # q4_0
                code = (nib - 8).to(tl.float32)
            else:  # nf4: the level table (16 fp32, cached)
                code = tl.load(nf4 + nib, mask=msk, other=0.0)
        x = code * sc
        if HAS_RING:  # the newest `res` positions come from the fp16 ring, slot p % res
            win = (pos >= length - res) & pos_ok
            wm = win[:, None] & ch_ok[None, :]
            r = tl.load(ring + b * srb + (pos % res)[:, None].to(tl.int64) * srl + ch[None, :], mask=wm,
                        other=0.0).to(tl.float32)
            x = tl.where(wm, r, x)
    return x

def _decode_kernel(q, qn, knull, vnull, out, m_out, l_out, acc_out, nf4,
                  k1d, k1s, k1r, k1db, k1dl, k1sb, k1sl, k1rb, k1rl, k1qb, k1res,
                  k2d, k2s, k2r, k2db, k2dl, k2sb, k2sl, k2rb, k2rl, k2qb, k2res,
                  vd, vs, vr, vdb, vdl, vsb, vsl, vrb, vrl, vqb, vres,
                  q_start, length, chunk, n_split, NKV, T, G,
                  D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
                  BD1: tl.constexpr, BD2: tl.constexpr, BDV: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  K1KIND: tl.constexpr, K2KIND: tl.constexpr, VKIND: tl.constexpr,
                  K1RING: tl.constexpr, K2RING: tl.constexpr, VRING: tl.constexpr,
                  HAS_K2: tl.constexpr, HAS_NULL: tl.constexpr, SPLIT: tl.constexpr,
                  USE_DOT: tl.constexpr):
    pid = tl.program_id(0)  # b * NKV + kv-head
    sp = tl.program_id(1)  # split
    b = (pid // NKV).to(tl.int64)
    kh = pid % NKV
    RQ = G * T
    DQK: tl.constexpr = D1 + D2
    r = tl.arange(0, BLOCK_R)
    r_ok = r < RQ
    q_pos = q_start + r % T
    hq = kh * G + r // T  # the query head of each row
    c1 = tl.arange(0, BD1)
    c1_ok = c1 < D1
    cv = tl.arange(0, BDV)
    cv_ok = cv < DV
    qrow = pid.to(tl.int64) * RQ * DQK + r[:, None] * DQK
    q1 = tl.load(q + qrow + c1[None, :], mask=r_ok[:, None] & c1_ok[None, :], other=0.0)
    if HAS_K2:
        c2 = tl.arange(0, BD2)
        c2_ok = c2 < D2
        q2 = tl.load(q + qrow + D1 + c2[None, :], mask=r_ok[:, None] & c2_ok[None, :], other=0.0)

    first = sp == 0
    if HAS_NULL:  # one never-masked key, in split 0 only: it seeds max, sum and output
        qn1 = tl.load(qn + qrow + c1[None, :], mask=r_ok[:, None] & c1_ok[None, :], other=0.0)
        kn1 = tl.load(knull + hq[:, None] * DQK + c1[None, :], mask=r_ok[:, None] & c1_ok[None, :], other=0.0)
        s_null = tl.sum(qn1 * kn1, axis=1)
        if HAS_K2:
            qn2 = tl.load(qn + qrow + D1 + c2[None, :], mask=r_ok[:, None] & c2_ok[None, :], other=0.0)
            kn2 = tl.load(knull + hq[:, None] * DQK + D1 + c2[None, :], mask=r_ok[:, None] & c2_ok[None, :],
                          other=0.0)
            s_null += tl.sum(qn2 * kn2, axis=1)
        vn = tl.load(vnull + hq[:, None] * DV + cv[None, :], mask=r_ok[:, None] & cv_ok[None, :], other=0.0)
        m = tl.where(first, s_null, -3.4028234663852886e38)
        l_i = tl.where(first, tl.full([BLOCK_R], 1.0, tl.float32), 0.0)
        acc = tl.where(first, vn, 0.0)
    else:
        m = tl.full([BLOCK_R], -3.4028234663852886e38, tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BDV], tl.float32)

    ch1 = kh * D1 + c1  # this kv-head's channels of each stream
    chv = kh * DV + cv
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, length)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_ok = pos < hi
        k1 = _load_stream_jit(k1d, k1s, k1r, nf4, k1db, k1dl, k1sb, k1sl, k1rb, k1rl, b, pos, pos_ok, ch1, c1_ok,
                         length, k1qb, k1res, K1KIND, K1RING)
        if USE_DOT:
            s = tl.dot(q1, tl.trans(k1), input_precision="ieee")
        else:
            s = tl.sum(q1[:, None, :] * k1[None, :, :], axis=2)
        if HAS_K2:
            k2 = _load_stream_jit(k2d, k2s, k2r, nf4, k2db, k2dl, k2sb, k2sl, k2rb, k2rl, b, pos, pos_ok,
                             kh * D2 + c2, c2_ok, length, k2qb, k2res, K2KIND, K2RING)
            if USE_DOT:
                s += tl.dot(q2, tl.trans(k2), input_precision="ieee")
            else:
                s += tl.sum(q2[:, None, :] * k2[None, :, :], axis=2)
        valid = pos_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(valid, s, -3.4028234663852886e38)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        corr = tl.exp(m - m_new)
        p = tl.where(valid, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * corr + tl.sum(p, axis=1)
        vt = _load_stream_jit(vd, vs, vr, nf4, vdb, vdl, vsb, vsl, vrb, vrl, b, pos, pos_ok, chv, cv_ok,
                         length, vqb, vres, VKIND, VRING)
        if USE_DOT:
            pv = tl.dot(p, vt, input_precision="ieee")
        else:
            pv = tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        acc = acc * corr[:, None] + pv
        m = m_new

    omask = r_ok[:, None] & cv_ok[None, :]
    if SPLIT:
        part = pid.to(tl.int64) * n_split + sp
        tl.store(m_out + part * BLOCK_R + r, m)
        tl.store(l_out + part * BLOCK_R + r, l_i)
        tl.store(acc_out + (part * BLOCK_R + r[:, None]) * DV + cv[None, :], acc, mask=cv_ok[None, :])
    else:
        tl.store(out + (pid.to(tl.int64) * RQ + r[:, None]) * DV + cv[None, :], acc / l_i[:, None], mask=omask)

def _merge_kernel(m_in, l_in, acc_in, out, n_split, RQ, DV: tl.constexpr, BDV: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """Pass 2: merge the splits' (max, denominator, output) of one (batch, kv-head)."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_R)
    cv = tl.arange(0, BDV)
    cv_ok = cv < DV
    m = tl.full([BLOCK_R], -3.4028234663852886e38, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BDV], tl.float32)
    for sp in range(n_split):
        part = pid.to(tl.int64) * n_split + sp
        m_s = tl.load(m_in + part * BLOCK_R + r)
        l_s = tl.load(l_in + part * BLOCK_R + r)
        a_s = tl.load(acc_in + (part * BLOCK_R + r[:, None]) * DV + cv[None, :], mask=cv_ok[None, :], other=0.0)
        m_new = tl.maximum(m, m_s)
        c_old = tl.exp(m - m_new)
        c_new = tl.exp(m_s - m_new)
        l_i = l_i * c_old + l_s * c_new
        acc = acc * c_old[:, None] + a_s * c_new[:, None]
        m = m_new
    omask = (r < RQ)[:, None] & cv_ok[None, :]
    tl.store(out + (pid.to(tl.int64) * RQ + r[:, None]) * DV + cv[None, :], acc / l_i[:, None], mask=omask)


@functools.lru_cache(maxsize=1)
def _kernels():
    """(decode_kernel, merge_kernel), decorated with `triton.jit` on first use."""
    global tl, _load_stream_jit
    import triton
    import triton.language

    tl = triton.language
    _load_stream_jit = triton.jit(_load_stream)
    return triton.jit(_decode_kernel), triton.jit(_merge_kernel)


def _stream_args(s: kvc.StreamCache) -> tuple[list, int, bool]:
    """Kernel arguments of one stream: pointers, strides, qblock, ring length; its kind code and
    whether it has a ring. Absent tensors are replaced by `data` (never read)."""
    if s.data.stride(-1) != 1:
        raise ValueError(f"stream {s.spec.name}: storage not contiguous in its last dim")
    scale = s.scale if s.scale is not None else s.data
    ring = s.ring if s.ring is not None else s.data
    res = s.residual if (s.quantized and s.ring is not None) else 0
    args = [s.data, scale, ring, s.data.stride(0), s.data.stride(1), scale.stride(0), scale.stride(1),
            ring.stride(0), ring.stride(1), s.qblock if s.quantized else 1, max(res, 1)]
    return args, _KIND_CODE[s.kind], res > 0


@functools.lru_cache(maxsize=8)
def _nf4_table(device: str) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def fused_attend(q_BHTD: torch.Tensor, streams: dict[str, kvc.StreamCache], q_start: int, length: int,
                 null_kv: tuple[torch.Tensor, torch.Tensor] | None, *, n_kv_head: int,
                 key_names: tuple[str, ...], decode_block: int = 1024, mode: str = "auto",
                 block_n: int | None = None, chunk: int | None = None, use_dot: bool | None = None) -> torch.Tensor:
    """`cached_attend` (same arguments, same result: (B, H, T, Dv) in q's dtype) in one fused
    Triton kernel. `decode_block` is accepted for the signature and ignored (the kernel's key block
    is `block_n`). `mode`: 'one_pass', 'two_pass' (split-K over `chunk` keys per split, a multiple
    of `block_n`) or 'auto' (two_pass when one pass would leave the GPU's SMs idle).
    `use_dot`: tl.dot for the scores and P.V (None: on CUDA when the row/dims allow it); else
    broadcast products (exact fp32). Raises ValueError for arguments `unsupported_reason` refuses."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    why = unsupported_reason(q_BHTD, streams, n_kv_head=n_kv_head, key_names=key_names)
    if why is not None:
        raise ValueError(f"fused decode attention unsupported: {why}")
    decode_kernel, merge_kernel = _kernels()
    b, h, t, dqk = q_BHTD.shape
    n_kv, g = n_kv_head, h // n_kv_head
    rq = g * t
    dev = q_BHTD.device
    length, q_start = int(length), int(q_start)
    d1 = streams[key_names[0]].dim // n_kv
    d2 = streams[key_names[1]].dim // n_kv if len(key_names) == 2 else 0
    dv = streams["v"].dim // n_kv

    qf = q_BHTD.float()
    q_rows = rotate_queries(qf, streams, key_names, n_kv).reshape(b * n_kv, rq, dqk).contiguous()
    qn_rows = qf.reshape(b * n_kv, rq, dqk).contiguous() if null_kv is not None else q_rows
    if null_kv is not None:
        knull = null_kv[0].float().contiguous()
        vnull = null_kv[1].float().contiguous()
    else:
        knull = vnull = q_rows

    block_r = max(_pow2(rq), 1)
    if use_dot is None:
        use_dot = dev.type == "cuda" and min(d1, d2 or 16, dv) >= 16
    if use_dot:
        block_r = max(block_r, 16)
    if block_n is None:
        block_n = 64 if dev.type == "cuda" else 32
    block_n = max(16 if use_dot else 1, _pow2(block_n))
    if chunk is None:
        if mode == "one_pass":
            n_split = 1
        else:  # enough programs for ~2 waves of the SMs, each split at least 4 key blocks
            want = max(1, (2 * _num_sms(dev)) // max(1, b * n_kv))
            chunk = max(4 * block_n, _cdiv(_cdiv(length, want), block_n) * block_n)
            n_split = _cdiv(length, chunk)
            if mode == "two_pass" and n_split == 1 and length > block_n:  # split in (at least) two
                chunk = _cdiv(_cdiv(length, 2), block_n) * block_n
                n_split = _cdiv(length, chunk)
    else:
        chunk = max(block_n, _cdiv(chunk, block_n) * block_n)
        n_split = _cdiv(length, chunk)
    split = mode == "two_pass" or (mode == "auto" and n_split > 1)
    if not split:
        n_split, chunk = 1, max(length, 1)

    k1a, k1kind, k1ring = _stream_args(streams[key_names[0]])
    k2a, k2kind, k2ring = _stream_args(streams[key_names[1]]) if d2 else (k1a, k1kind, k1ring)
    va, vkind, vring = _stream_args(streams["v"])
    out = torch.empty((b * n_kv, rq, dv), dtype=torch.float32, device=dev)
    if split:
        m_part = torch.empty((b * n_kv, n_split, block_r), dtype=torch.float32, device=dev)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty((b * n_kv, n_split, block_r, dv), dtype=torch.float32, device=dev)
    else:
        m_part = l_part = acc_part = out
    decode_kernel[(b * n_kv, n_split)](
        q_rows, qn_rows, knull, vnull, out, m_part, l_part, acc_part, _nf4_table(str(dev)),
        *k1a, *k2a, *va, q_start, length, chunk, n_split, n_kv, t, g,
        D1=d1, D2=d2, DV=dv, BD1=_pow2(d1), BD2=_pow2(max(d2, 1)), BDV=_pow2(dv), BLOCK_R=block_r,
        BLOCK_N=block_n, K1KIND=k1kind, K2KIND=k2kind, VKIND=vkind, K1RING=k1ring, K2RING=k2ring, VRING=vring,
        HAS_K2=bool(d2), HAS_NULL=null_kv is not None, SPLIT=split, USE_DOT=bool(use_dot))
    if split:
        merge_kernel[(b * n_kv,)](m_part, l_part, acc_part, out, n_split, rq, DV=dv, BDV=_pow2(dv), BLOCK_R=block_r)
    return out.reshape(b, h, t, dv).to(q_BHTD.dtype)


def decode_attend(kv_fused: str, q_BHTD: torch.Tensor, streams: dict[str, kvc.StreamCache], q_start: int,
                  length: int, null_kv: tuple[torch.Tensor, torch.Tensor] | None, *, n_kv_head: int,
                  key_names: tuple[str, ...], decode_block: int) -> torch.Tensor:
    """`cached_attend`, or this kernel when `kv_fused` names it and it supports the layer (else a
    warning naming the reason, once per reason, and `cached_attend`)."""
    if kv_fused not in KV_FUSED_MODES:
        raise ValueError(f"kv_fused {kv_fused!r}: expected one of {', '.join(KV_FUSED_MODES)}")
    if kv_fused != "none":
        why = unsupported_reason(q_BHTD, streams, n_kv_head=n_kv_head, key_names=key_names)
        if why is None:
            return fused_attend(q_BHTD, streams, q_start, length, null_kv, n_kv_head=n_kv_head, key_names=key_names,
                                mode=KV_FUSED_MODES[kv_fused])
        warnings.warn(f"--kv-fused {kv_fused}: {why}; using cached_attend", stacklevel=2)
    return cached_attend(q_BHTD, streams, q_start, length, null_kv, n_kv_head=n_kv_head, key_names=key_names,
                         decode_block=decode_block)


@functools.cache
def cache_attention(kv_fused: str = "none") -> Callable[..., torch.Tensor]:
    """The attention over a layer's cache that the mode `kv_fused` names, with `cached_attend`'s
    signature (what `DBAModel.forward_cached` takes as `cache_attend`): `cached_attend` itself for
    "none"; for "triton" / "triton1pass" / "triton2pass" this kernel, auto / one_pass / two_pass (on
    a CUDA device, or on CPU tensors with TRITON_INTERPRET=1), falling back to `cached_attend`
    with a warning on a layer it cannot take. Memoised, as the JAX mirror (a mode always gives
    the same function)."""
    if kv_fused not in KV_FUSED_MODES:
        raise ValueError(f"kv_fused {kv_fused!r}: expected one of {', '.join(KV_FUSED_MODES)}")
    return cached_attend if kv_fused == "none" else functools.partial(decode_attend, kv_fused)


def resolve_kv_fused(choice: str, device: torch.device | str) -> tuple[str, str]:
    """`--kv-fused choice` (dba/fused.py) for a model on `device`: (the mode the decode functions
    take as `kv_fused`: the Triton kernel when the choice names it, compiled on CUDA, interpreted
    with TRITON_INTERPRET=1 when asked for on a CPU, else "none"; what runs, for the info line:
    'none', 'triton2pass', 'triton (interpreted)', ...). An explicit kernel that cannot run here
    is a one-line UserError; `auto` then means none."""
    from dba.errors import UserError
    from dba.fused import resolve_fused

    kernel, interpret = resolve_fused(choice, "torch", torch.device(device).type == "cuda")
    if kernel == "none":
        return "none", "none"
    if interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError(f"--kv-fused {choice} on a CPU needs TRITON_INTERPRET=1 set before triton is imported", 1)
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported (after this)
    if not triton_available():
        if choice == "auto":
            return "none", "none"
        raise UserError(f"--kv-fused {choice}: triton is not installed (pip install triton; Linux)", 1)
    return kernel, kernel + (" (interpreted)" if interpret else "")
