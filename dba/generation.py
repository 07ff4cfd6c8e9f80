"""Argument checks shared by both frameworks' decode and generation (framework-free)."""

from __future__ import annotations

from typing import Any, Callable

from dba.errors import UserError

# The online cache policy during generation: (cache capacity) -> (KVPolicy, decode_block) to use
# for a cache of that many tokens (dba/self_opt.py's OnlinePlanner).
PlanFor = Callable[[int], "tuple[Any, int]"]


def online_capacities(prompt_len: int, max_new_tokens: int, interval: int) -> list[int]:
    """The cache capacities an online generation grows through: the first bucket holds the prompt
    and `interval` new tokens, each next one doubles it, the last is prompt + new tokens."""
    total = prompt_len + max_new_tokens
    caps, cap = [], prompt_len + min(interval, max_new_tokens)
    while True:
        caps.append(min(cap, total))
        if cap >= total:
            return caps
        cap *= 2


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def generation_cache_len(prompt_len: int, max_new_tokens: int, max_len: int | None) -> int:
    """The cache capacity of a generation (`max_len`, default prompt + new tokens), after checking
    that the prompt holds a token and that prompt and new tokens fit."""
    if prompt_len == 0:
        raise UserError("the prompt is empty: give at least one token")
    max_len = prompt_len + max_new_tokens if max_len is None else max_len
    check_fits(prompt_len + max_new_tokens, max_len)
    return max_len


def check_fits(n_tokens: int, max_len: int) -> None:
    if n_tokens > max_len:
        raise UserError(f"{n_tokens} tokens do not fit a KV cache of max_len={max_len}")


def check_decode(n_tokens: int, prefill: int, decode_block: int, max_len: int) -> None:
    """`decode_logits` arguments: prefill within the tokens, a positive block, room in the cache."""
    if not 0 <= prefill <= n_tokens:
        raise UserError(f"prefill={prefill} must be between 0 and the number of tokens ({n_tokens})")
    if decode_block < 1:
        raise UserError(f"decode_block must be >= 1, got {decode_block}")
    check_fits(n_tokens, max_len)
