"""What a cache policy costs, measured through the real decode path (SPEC §5): teacher-forced
scores of a policy's cache against an fp32 cache on the same tokens. Mirrors jax_model/evaluate.py.

Both caches take the same prompt (fresh attention, v29's order), then the same tokens one at a
time, exactly as generation feeds them. Per scored position only a few numbers are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from dba.errors import UserError
from dba.kvspec import KVPolicy
from torch_ref import kvcache as kvc
from torch_ref.triton_decode import cache_attention

if TYPE_CHECKING:
    from torch_ref.model import DBAModel

REFERENCE = KVPolicy(kind="fp32")
SCORES = ("nll", "ref_nll", "kl", "agree", "correct", "ref_correct")


def _position_scores(logits_ref_BV: torch.Tensor, logits_BV: torch.Tensor, target_B: torch.Tensor):
    lr = torch.log_softmax(logits_ref_BV.float(), dim=-1)
    lp = torch.log_softmax(logits_BV.float(), dim=-1)
    pick = lambda lx: -lx.gather(-1, target_B[:, None])[:, 0]  # noqa: E731
    kl = torch.sum(lr.exp() * (lr - lp), dim=-1)  # KL(fp32 || policy)
    top_ref, top = lr.argmax(-1), lp.argmax(-1)
    return pick(lp), pick(lr), kl, top == top_ref, top == target_B, top_ref == target_B


@torch.no_grad()
def score_policy(model: DBAModel, tokens_BL, n_prompt: int, policy: KVPolicy, *,
                 decode_block: int = 1024, kv_fused: str = "none") -> dict[str, np.ndarray]:
    """Scores of `policy`'s cache against an fp32 cache, teacher-forced on tokens (B, L); the
    same arrays as jax_model.evaluate.score_policy (`kv_fused` as there)."""
    idx = model.as_tokens(tokens_BL)
    b, length = idx.shape
    if not 0 <= n_prompt < length - 1:
        raise UserError(f"the prompt ({n_prompt} tokens) must leave at least one of {length - 1} inputs to score")
    policy.check_for(model.cfg)
    ref_cache = kvc.init_cache(model.cfg, REFERENCE, b, length - 1, device=idx.device)
    cache = kvc.init_cache(model.cfg, policy, b, length - 1, device=idx.device)
    x_BT, y_BT = idx[:, :-1], idx[:, 1:]
    kw = {"decode_block": decode_block, "cache_attend": cache_attention(kv_fused)}
    if n_prompt:
        prompt = x_BT[:, :n_prompt]
        model.forward_cached(prompt, ref_cache, fresh=True, last_only=True, **kw)
        model.forward_cached(prompt, cache, fresh=True, last_only=True, **kw)
    rows = []
    for t in range(n_prompt, length - 1):
        logits_ref, ref_cache = model.forward_cached(x_BT[:, t:t + 1], ref_cache, fresh=False, **kw)
        logits, cache = model.forward_cached(x_BT[:, t:t + 1], cache, fresh=False, **kw)
        rows.append(_position_scores(logits_ref[:, 0], logits[:, 0], y_BT[:, t]))
    return {name: torch.stack([r[i] for r in rows], dim=1).cpu().numpy() for i, name in enumerate(SCORES)}


@torch.no_grad()
def decode_step_seconds(model: DBAModel, policy: KVPolicy, ctx: int, n_steps: int, decode_block: int,
                        repeats: int = 3, kv_fused: str = "none") -> float:
    """Seconds per decode step (batch 1) with the cache filled to `ctx - n_steps` tokens; the same
    measurement as jax_model.evaluate.decode_step_seconds."""
    import time

    n = max(1, min(int(n_steps), int(ctx) - 1))
    token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    best, attend = float("inf"), cache_attention(kv_fused)
    for i in range(repeats + 1):
        cache = kvc.init_cache(model.cfg, policy, 1, int(ctx), device=model.device)
        cache.pos = int(ctx) - n
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            logits, cache = model.forward_cached(token, cache, fresh=False, decode_block=decode_block,
                                                 cache_attend=attend)
        float(logits[0, 0, 0])  # waits for the device
        if i:
            best = min(best, (time.perf_counter() - t0) / n)
    return best


@torch.no_grad()
def score_against(model: DBAModel, ref: DBAModel, tokens_NL, batch: int = 1, on_batch=None) -> dict[str, np.ndarray]:
    """`model` against another model `ref` (a teacher) on the same sequences (N, L), full causal
    forwards: the same arrays as jax_model.evaluate.score_against."""
    if model.cfg.vocab_size != ref.cfg.vocab_size:
        raise UserError(f"the models' vocabularies differ ({model.cfg.vocab_size} vs {ref.cfg.vocab_size} ids)")
    parts = []
    for i in range(0, len(tokens_NL), batch):
        idx = model.as_tokens(tokens_NL[i:i + batch])
        x, y = idx[:, :-1], idx[:, 1:]
        lp, lr = model(x), ref(x)
        b, t, v = lp.shape
        outs = _position_scores(lr.reshape(b * t, v), lp.reshape(b * t, v), y.reshape(-1))
        parts.append([o.reshape(b, t).float().cpu().numpy() for o in outs])
        if on_batch is not None:
            on_batch(b)
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(SCORES)}
