"""Attention over a KV cache (SPEC §5 "Decode reads the cache in blocks"): T queries against the
first `length` cached tokens, one block of `decode_block` keys at a time with an online softmax
(running max, denominator and output in fp32), so a long quantized cache is never dequantized
whole. Plain arguments, no modules: `Attention` calls it with its queries and its layer's
streams, as its default `cache_attend` (a fused kernel with the same signature can stand in).
Mirrors jax_model/cached_attention.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torch_ref import kvcache as kvc
from torch_ref.layers import hadamard, kv_heads

# What `Attention` takes as `cache_attend`: a function with `cached_attend`'s signature.
CacheAttend = Callable[..., torch.Tensor]


def rotate_queries(q_BHTD: torch.Tensor, streams: dict[str, kvc.StreamCache], key_names: tuple[str, ...],
                   n_kv: int) -> torch.Tensor:
    """q_cat with the slice of each rotated key stream (`StreamCache.rot_dim`) replaced by
    H q / n (n its head dim; 1/n is exact), so it scores against the stored H k exactly as q
    against k (H^T H = n I). q_cat itself when no stream is rotated."""
    if not any(streams[name].rot_dim for name in key_names):
        return q_BHTD
    parts, at = [], 0
    for name in key_names:
        s = streams[name]
        d = s.dim // n_kv
        x = q_BHTD[..., at:at + d]
        if s.rot_dim:
            if s.rot_dim != d:
                raise ValueError(f"stream {name}: rotated over {s.rot_dim} channels, but its head dim is {d}")
            x = (hadamard(x.to(torch.float32), d) * (1.0 / d)).to(q_BHTD.dtype)
        parts.append(x)
        at += d
    return torch.cat(parts, dim=-1)


def cached_attend(q_BHTD: torch.Tensor, streams: dict[str, kvc.StreamCache], q_start: int, length: int,
                  null_kv: tuple[torch.Tensor, torch.Tensor] | None, *, n_kv_head: int,
                  key_names: tuple[str, ...], decode_block: int) -> torch.Tensor:
    """Attention of T queries q_cat (B, H, T, Dqk) at absolute positions q_start.. over the first
    `length` tokens of a layer's cached `streams` (key streams `key_names`, concatenated per head
    in q_cat's order, and "v"), one block of `decode_block` keys at a time (online softmax, fp32
    accumulators); `null_kv` the null key (H, Dqk) and value (H, Dv) per query head, or None.
    Returns (B, H, T, Dv) in q's dtype. Rotated key streams (`+rot`) are scored with rotated
    queries (`rotate_queries`); the null key is not rotated and scores against q itself. Query
    head h uses kv-head h // (H/K): the G = H/K query heads of a kv-head go through one matmul as
    G*T rows, so K/V are never repeated."""
    b, h, t, _ = q_BHTD.shape
    n_kv = n_kv_head
    dev = q_BHTD.device
    max_len = next(iter(streams.values())).max_len
    blk = min(decode_block, max_len)
    q = q_BHTD.float()
    q_rows = rotate_queries(q, streams, key_names, n_kv).reshape(b, n_kv, (h // n_kv) * t, -1)
    q_pos = q_start + torch.arange(t, device=dev)
    dv = streams["v"].dim // n_kv

    if null_kv is None:
        m = torch.full((b, h, t), torch.finfo(torch.float32).min, device=dev)
        l = torch.zeros((b, h, t), device=dev)
        acc = torch.zeros((b, h, t, dv), device=dev)
    else:  # the null key is never masked: it seeds the running max, sum and output
        k_null, v_null = null_kv
        m = torch.einsum("bhtd,hd->bht", q, k_null.float())
        l = torch.ones_like(m)
        acc = v_null.float()[None, :, None, :].expand(b, h, t, dv).clone()

    for start in range(0, length, blk):
        # Eager torch takes any shape, so the last block is only as long as what is cached: no
        # dequantizing positions past `length` (JAX keeps one block shape and masks them; the
        # masked positions add exact zeros, so the two agree).
        size = min(blk, length - start)
        block = {name: kvc.read(s, start, size, length) for name, s in streams.items()}
        k, v = kv_heads(block, key_names, n_kv)  # (B, K, size, D)
        s = torch.matmul(q_rows, k.float().transpose(-1, -2)).reshape(b, h, t, size)
        # A block every query sees (all of decode's) needs no mask: three ops fewer per block.
        valid = None
        if start + size - 1 > q_start:
            k_pos = start + torch.arange(size, device=dev)
            valid = k_pos[None, :] <= q_pos[:, None]
            s = s.masked_fill(~valid, torch.finfo(torch.float32).min)
        m_new = torch.maximum(m, s.amax(-1))
        corr = torch.exp(m - m_new)
        p = torch.exp(s - m_new[..., None])
        if valid is not None:
            p = p.masked_fill(~valid, 0.0)
        l = l * corr + p.sum(-1)
        pv = torch.matmul(p.reshape(b, n_kv, -1, size), v.float()).reshape(b, h, t, dv)
        acc = acc * corr[..., None] + pv
        m = m_new
    return (acc / l[..., None]).to(q_BHTD.dtype)
