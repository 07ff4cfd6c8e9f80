"""Cached inference: prefill, the decode step, and teacher-forced `decode_logits` (SPEC §5).

Order of operations (v29's): a prompt through an *empty* cache attends over its own fresh K/V
and then stores them; every later call first appends its K/V and then attends over what the
cache returns (dequantized, newest tokens exact from the fp16 window), streaming the cache in
`decode_block` blocks with an online softmax. Everything runs through the model's one cached
path, `DBAModel.forward_cached`; the cache is updated in place and returned. `kv_fused` picks
the attention over the cache ("none": `cached_attend`; "triton" / "triton1pass" / "triton2pass":
the fused kernel, `triton_decode.cache_attention`). Mirrors jax_model/decode.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dba.errors import UserError
from dba.generation import check_decode
from dba.kvspec import KVPolicy, check_room
from torch_ref import kvcache as kvc
from torch_ref.triton_decode import cache_attention

if TYPE_CHECKING:
    from torch_ref.model import DBAModel


def _fresh(cache: kvc.Cache, fresh: bool | None) -> bool:
    """`fresh` resolved against the cache: None means "the cache is empty"; fresh attention over
    a cache that already holds tokens would ignore them, so it is refused."""
    if fresh is None:
        return cache.pos == 0
    if fresh and cache.pos > 0:
        raise UserError(f"fresh attention needs an empty cache; this one holds {cache.pos} tokens")
    return fresh


def prefill(model: DBAModel, cache: kvc.Cache, tokens_BT: torch.Tensor, *, fresh: bool | None = None,
            decode_block: int = 1024, last_only: bool = False, kv_fused: str = "none") -> tuple[torch.Tensor, kvc.Cache]:
    """Run a prompt (or a further chunk of one) through the cache: (logits (B, T, V), or (B, 1, V)
    for the last position only with `last_only`; the cache, updated in place). `fresh` defaults
    to v29's order: fresh attention when the cache is empty, else append-then-read."""
    check_room(cache.pos, tokens_BT.shape[1], cache.max_len)
    return model.forward_cached(tokens_BT, cache, fresh=_fresh(cache, fresh), decode_block=decode_block,
                                last_only=last_only, cache_attend=cache_attention(kv_fused))


def decode_step(model: DBAModel, cache: kvc.Cache, token_B: torch.Tensor, *,
                decode_block: int = 1024, kv_fused: str = "none") -> tuple[torch.Tensor, kvc.Cache]:
    """One new token per row: append its K/V, attend over the cache; (logits (B, V), cache)."""
    check_room(cache.pos, 1, cache.max_len)
    logits, cache = model.forward_cached(token_B[:, None], cache, fresh=False, decode_block=decode_block,
                                         cache_attend=cache_attention(kv_fused))
    return logits[:, 0], cache


def decode_logits(model: DBAModel, tokens, prefill: int, policy: KVPolicy | None = None,
                  decode_block: int = 1024, max_len: int | None = None, kv_fused: str = "none") -> torch.Tensor:
    """Teacher forcing: prefill `prefill` tokens through an empty cache, then feed the rest one
    at a time; logits (B, N, V) for every position (exported as `torch_ref.decode_logits`)."""
    idx = model.as_tokens(tokens)
    b, n = idx.shape
    max_len = n if max_len is None else max_len
    check_decode(n, prefill, decode_block, max_len)
    cache = kvc.init_cache(model.cfg, policy or KVPolicy(kind="fp32"), b, max_len, device=idx.device)
    check_room(0, n, cache.max_len)  # the cache starts empty
    attend, parts = cache_attention(kv_fused), []
    if prefill > 0:
        logits, cache = model.forward_cached(idx[:, :prefill], cache, fresh=True, decode_block=decode_block,
                                             cache_attend=attend)
        parts.append(logits)
    for i in range(prefill, n):
        logits, cache = model.forward_cached(idx[:, i:i + 1], cache, fresh=False, decode_block=decode_block,
                                             cache_attend=attend)
        parts.append(logits)
    return torch.cat(parts, dim=1)


def kernel_disagreement(model: DBAModel, policy: KVPolicy, batch: int, max_len: int, decode_block: int,
                        kv_fused: str) -> str | None:
    """Why the fused kernel `kv_fused` cannot serve this shape, or None: one decode step after a
    short prompt, through a cache of `max_len`, with the kernel and with the cached attention
    (dba/kernel_check.py decides and remembers; the JAX mirror is jax_model.decode's)."""
    import numpy as np

    from dba.kernel_check import disagreement

    n = min(max_len, 16)
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (batch, n)),
                             device=next(model.parameters()).device)
    with torch.no_grad():
        return disagreement(lambda mode: decode_logits(model, tokens, n - 1, policy, decode_block=decode_block,
                                                       max_len=max_len, kv_fused=mode)[:, -1],
                            kv_fused, lambda t: t.float().cpu().numpy())
