"""Batched generation over the KV cache. Mirrors jax_model/sampling.py: greedy when
`temperature == 0` or `top_k == 1`; otherwise temperature, top-k, then top-p filtering. The
prompt goes through `decode.prefill`, every new token through `model.forward_cached`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dba.errors import UserError
from dba.generation import PlanFor, check_sampling, generation_cache_len, online_capacities
from dba.kvspec import KVPolicy
from torch_ref import decode
from torch_ref import kvcache as kvc
from torch_ref.recache import recache
from torch_ref.triton_decode import cache_attention

if TYPE_CHECKING:
    from torch_ref.compiled_decode import CompiledDecoder
    from torch_ref.model import DBAModel


def filter_logits(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_desc = torch.sort(logits, dim=-1, descending=True).values
        probs = torch.softmax(sorted_desc, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        keep_sorted = before < top_p
        cutoff = torch.where(keep_sorted, sorted_desc, torch.full_like(sorted_desc, float("inf"))).amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits


def sample_next(logits_BV: torch.Tensor, generator: torch.Generator, temperature: float,
                top_k: int | None, top_p: float | None) -> torch.Tensor:
    if temperature == 0.0 or top_k == 1:
        return logits_BV.argmax(-1)
    probs = torch.softmax(filter_logits(logits_BV, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits_BV.device)


def generate(model: DBAModel, prompt, max_new_tokens: int = 64, policy: KVPolicy | None = None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_id: int | None = None, decode_block: int = 1024,
             max_len: int | None = None, plan_for: PlanFor | None = None, interval: int = 256,
             kv_fused: str = "none") -> torch.Tensor:
    """Prompt (B, T) ids -> (B, T + max_new_tokens) ids; rows that emit `eos_id` pad with it.
    `plan_for` / `interval`: the online cache policy, as in jax_model.sampling.generate;
    `kv_fused`: the attention over the cache, as in `decode.prefill`. The compiled decode step:
    `compiled_decode.CompiledDecoder.generate`."""
    return generate_with(None, model, prompt, max_new_tokens, policy, temperature, top_k, top_p, seed, eos_id,
                         decode_block, max_len, plan_for, interval, kv_fused)


@torch.no_grad()
def generate_with(decoder: CompiledDecoder | None, model: DBAModel, prompt, max_new_tokens: int = 64,
                  policy: KVPolicy | None = None, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, eos_id: int | None = None, decode_block: int = 1024,
                  max_len: int | None = None, plan_for: PlanFor | None = None, interval: int = 256,
                  kv_fused: str = "none") -> torch.Tensor:
    """`generate`, every new token through `decoder.step` (a `CompiledDecoder` of this model; the
    prompt stays eager) when one is given: not with `plan_for`, whose cache changes shape, nor
    with a fused kernel."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if decoder is not None and (plan_for is not None or kv_fused != "none"):
        raise UserError("a compiled decode step runs its own attention over a fixed cache: "
                        "not with an online policy or a fused kernel")
    idx = model.as_tokens(prompt)
    b, t = idx.shape
    caps = [generation_cache_len(t, max_new_tokens, max_len)]
    if plan_for is not None:
        caps = online_capacities(t, max_new_tokens, int(interval))
        policy, decode_block = plan_for(caps[0])
    cache = kvc.init_cache(model.cfg, policy or KVPolicy(kind="fp16"), b, caps[0], device=idx.device)
    logits, cache = decode.prefill(model, cache, idx, decode_block=decode_block, last_only=True, kv_fused=kv_fused)
    logits = logits[:, -1]
    generator = torch.Generator().manual_seed(seed)
    done = torch.zeros(b, dtype=torch.bool, device=idx.device)
    out, attend = [idx], cache_attention(kv_fused)
    for i, cap in enumerate(caps):
        if i:
            policy, decode_block = plan_for(cap)
            cache = recache(model.cfg, cache, policy, max_len=cap)
        for _ in range(min(cap - t, max_new_tokens) - (len(out) - 1)):
            tok = sample_next(logits, generator, temperature, top_k, top_p)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done |= tok == eos_id
            out.append(tok[:, None])
            if decoder is not None:
                logits, cache = decoder.step(cache, tok)
                continue
            logits, cache = model.forward_cached(tok[:, None], cache, fresh=False, decode_block=decode_block,
                                                 cache_attend=attend)
            logits = logits[:, 0]
    return torch.cat(out, dim=1)
