"""Cached inference: prefill, the decode step, and teacher-forced `decode_logits` (SPEC §5).

Order of operations (v29's): a prompt through an *empty* cache attends over its own fresh K/V
and then stores them; every later call first appends its K/V and then attends over what the
cache returns (dequantized, newest tokens exact from the fp16 window), streaming the cache in
`decode_block` blocks with an online softmax. Mirrors jax_model/decode.py.
"""

from __future__ import annotations

import torch

from dba.errors import UserError
from dba.generation import check_decode
from dba.kvspec import KVPolicy
from torch_ref import kvcache as kvc
from torch_ref.layers import attend, merge_heads
from torch_ref.model import Attention, DBAModel


def cached_attend(attn: Attention, q_BHTD: torch.Tensor, streams: dict, q_start: int, length: int,
                  decode_block: int) -> torch.Tensor:
    """Attention of T queries (absolute positions q_start..) over the first `length` cached
    tokens, one block of `decode_block` keys at a time (online softmax, fp32 accumulators)."""
    b, h, t, _ = q_BHTD.shape
    dev = q_BHTD.device
    max_len = next(iter(streams.values())).max_len
    blk = min(decode_block, max_len)
    q = q_BHTD.float()
    q_pos = q_start + torch.arange(t, device=dev)
    dv = attn.cfg.v_dim // h

    null = attn.null_kv()
    if null is None:
        m = torch.full((b, h, t), torch.finfo(torch.float32).min, device=dev)
        l = torch.zeros((b, h, t), device=dev)
        acc = torch.zeros((b, h, t, dv), device=dev)
    else:  # the null key is never masked: it seeds the running max, sum and output
        k_null, v_null = null
        m = torch.einsum("bhtd,hd->bht", q, k_null.float())
        l = torch.ones_like(m)
        acc = v_null.float()[None, :, None, :].expand(b, h, t, dv).clone()

    for nominal in range(0, length, blk):
        start = min(nominal, max_len - blk)  # the last block may overlap the previous one
        block = {name: kvc.read(s, start, blk, length) for name, s in streams.items()}
        k, v = attn.kv_heads(block)
        s = torch.matmul(q, k.float().transpose(-1, -2))  # (B, H, T, blk)
        k_pos = start + torch.arange(blk, device=dev)
        valid = (k_pos >= nominal) & (k_pos < length)
        valid = valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        s = s.masked_fill(~valid, torch.finfo(torch.float32).min)
        m_new = torch.maximum(m, s.amax(-1))
        corr = torch.exp(m - m_new)
        p = torch.exp(s - m_new[..., None]).masked_fill(~valid, 0.0)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + torch.matmul(p, v.float())
        m = m_new
    return (acc / l[..., None]).to(q_BHTD.dtype)


@torch.no_grad()
def forward_cached(model: DBAModel, cache: kvc.Cache, tokens_BT: torch.Tensor, fresh: bool,
                   decode_block: int = 1024, last_only: bool = False) -> torch.Tensor:
    """Run tokens through the cache (mutated in place); logits (B, T, V), or (B, 1, V) for the
    last position only with `last_only`."""
    t = tokens_BT.shape[1]
    start = cache.pos
    if start + t > cache.max_len:
        raise UserError(f"KV cache overflow: {start} cached + {t} new tokens > max_len={cache.max_len}")
    positions = torch.arange(start, start + t, device=tokens_BT.device)
    x = model.embed(tokens_BT)
    for block, streams in zip(model.blocks, cache.layers):
        attn = block.attn
        hx = block.ln1(x)
        q = attn.queries(hx, positions)
        kv = attn.new_kv(hx, positions)
        for name, s in streams.items():
            kvc.write(s, kv[name], start)
        if fresh:
            k, v = attn.kv_heads(kv)
            y = attend(q, k.to(q.dtype), v, attn.null_kv())
        else:
            y = cached_attend(attn, q, streams, start, start + t, decode_block)
        x = x + attn.out_proj(merge_heads(y))
        x = x + block.ff(block.ln2(x))
    cache.pos = start + t
    return model.unembed(x[:, -1:] if last_only else x)


def prefill(model: DBAModel, cache: kvc.Cache, tokens_BT: torch.Tensor, decode_block: int = 1024) -> torch.Tensor:
    """A prompt through the cache: fresh attention when the cache is empty, else append-then-read."""
    return forward_cached(model, cache, tokens_BT, fresh=cache.pos == 0, decode_block=decode_block)


def decode_step(model: DBAModel, cache: kvc.Cache, token_B: torch.Tensor, decode_block: int = 1024) -> torch.Tensor:
    """One new token per row; logits (B, V)."""
    return forward_cached(model, cache, token_B[:, None], fresh=False, decode_block=decode_block)[:, 0]


def decode_logits(model: DBAModel, tokens, prefill: int, policy: KVPolicy | None = None,
                  decode_block: int = 1024, max_len: int | None = None) -> torch.Tensor:
    """Teacher forcing: prefill `prefill` tokens through an empty cache, then feed the rest one
    at a time; logits (B, N, V) for every position."""
    idx = model.as_tokens(tokens)
    b, n = idx.shape
    max_len = n if max_len is None else max_len
    check_decode(n, prefill, decode_block, max_len)
    cache = kvc.init_cache(model.cfg, policy or KVPolicy(kind="fp32"), b, max_len, device=idx.device)
    parts = []
    if prefill > 0:
        parts.append(forward_cached(model, cache, idx[:, :prefill], fresh=True, decode_block=decode_block))
    for i in range(prefill, n):
        parts.append(forward_cached(model, cache, idx[:, i:i + 1], fresh=False, decode_block=decode_block))
    return torch.cat(parts, dim=1)
