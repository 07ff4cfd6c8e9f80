"""The decode step under `torch.compile`: one program per cache shape, whatever the position.

Eager decode (`decode.decode_step`) dispatches ~700 small ops per token, and on a CPU that
dispatch, not the arithmetic, is most of a step. Compiling the step needs it to be the same
program at every position, so here the position is a 0-d tensor and the attention over the
cache has static shapes (`static_cached_attend`): the blocks cover the cache's whole capacity
(`max_len`, the last block shorter) with the positions past what is stored masked, and the
residual window is one more block read straight from the fp16 ring (jax_model's layout). It
therefore reads the cache's capacity every token: the win is for a cache sized to the
generation (`generate`'s default, prompt + new tokens).

`CompiledDecoder` compiles `DBAModel.forward_cached` with that attention (Inductor with
frozen weights and its C++ GEMM templates on a CPU: the one-row weight products are most of a
step and run ~3x faster than MKL's), falls back to the eager step with one warning naming why
when compiling or running fails, and says which ran in `mode`. MPS has no Inductor backend:
eager there. The first call compiles (tens of seconds on a small CPU); every later position and
every cache of the same shape reuse it.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import torch

from dba.kvspec import check_room
from torch_ref import kvcache as kvc
from torch_ref.cached_attention import rotate_queries
from torch_ref.layers import kv_heads

if TYPE_CHECKING:
    from torch_ref.model import DBAModel

_NEG = torch.finfo(torch.float32).min


def static_cached_attend(q_BHTD: torch.Tensor, streams: dict[str, kvc.StreamCache], q_start: torch.Tensor,
                         length: torch.Tensor, null_kv: tuple[torch.Tensor, torch.Tensor] | None, *,
                         n_kv_head: int, key_names: tuple[str, ...], decode_block: int) -> torch.Tensor:
    """`cached_attend` (same arguments and result) with `q_start` and `length` 0-d tensors and
    every shape fixed by the cache: blocks of `decode_block` over all `max_len` positions, those
    at or past `length - R` masked, then the R-token window from the ring (R the layer's residual
    window; 0: no window, the blocks run to `length`)."""
    b, h, t, _ = q_BHTD.shape
    n_kv = n_kv_head
    g = h // n_kv
    dev = q_BHTD.device
    max_len = next(iter(streams.values())).max_len
    blk = min(decode_block, max_len)
    q = q_BHTD.float()
    q_rows = rotate_queries(q, streams, key_names, n_kv).reshape(b, n_kv, g * t, -1)
    q_pos = q_start + torch.arange(t, device=dev)
    dv = streams["v"].dim // n_kv
    rings = {s.residual for s in streams.values() if s.residual > 0}
    if len(rings) > 1:
        raise ValueError(f"streams of one layer have different residual windows: {sorted(rings)}")
    r = rings.pop() if rings else 0
    store_end = length - r  # positions below come from the blocks, the rest from the window

    if null_kv is None:
        m = torch.full((b, n_kv, g * t), _NEG, device=dev)
        l = torch.zeros((b, n_kv, g * t), device=dev)
        acc = torch.zeros((b, n_kv, g * t, dv), device=dev)
    else:  # the null key is never masked: it seeds the running max, sum and output
        k_null, v_null = null_kv
        m = torch.einsum("bhtd,hd->bht", q, k_null.float()).reshape(b, n_kv, g * t)
        l = torch.ones_like(m)
        acc = v_null.float()[None, :, None, :].expand(b, h, t, dv).reshape(b, n_kv, g * t, dv)

    def update(m, l, acc, block, valid_TN):
        k, v = kv_heads(block, key_names, n_kv)  # (B, K, n, D)
        s = torch.matmul(q_rows, k.transpose(-1, -2)).reshape(b, n_kv, g, t, -1)
        s = torch.where(valid_TN, s, _NEG).reshape(b, n_kv, g * t, -1)
        m_new = torch.maximum(m, s.amax(-1))
        corr = torch.exp(m - m_new)
        p = torch.exp(s - m_new[..., None]).reshape(b, n_kv, g, t, -1)
        p = torch.where(valid_TN, p, 0.0).reshape(b, n_kv, g * t, -1)
        l = l * corr + p.sum(-1)
        return m_new, l, acc * corr[..., None] + torch.matmul(p, v)

    for start in range(0, max_len, blk):
        size = min(blk, max_len - start)
        block = {name: kvc.read_stored(s, start, size) for name, s in streams.items()}
        k_pos = start + torch.arange(size, device=dev)
        valid = (k_pos[None, :] < store_end) & (k_pos[None, :] <= q_pos[:, None])
        m, l, acc = update(m, l, acc, block, valid)
    if r:
        w_pos = kvc.window_positions(r, length)
        block = {name: kvc.read_window(s, r, length) for name, s in streams.items()}
        m, l, acc = update(m, l, acc, block, (w_pos[None, :] >= 0) & (w_pos[None, :] <= q_pos[:, None]))
    return (acc / l[..., None]).reshape(b, h, t, dv).to(q_BHTD.dtype)


def _inductor_config(device: torch.device) -> dict:
    """Frozen weights (constants: the GEMM templates pack them once) and autotuned GEMMs; on a
    CPU the candidates are Inductor's C++ templates and ATen. Applied with
    `torch._inductor.config.patch` around each call (compiling happens inside the first one):
    given as `torch.compile(options=)` they did not reach the GEMM selection."""
    config = {"freezing": True, "max_autotune": True,
              # its timing tables and stats on stderr are not for a user
              "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
    if device.type == "cpu":
        config["max_autotune_gemm_backends"] = "CPP,ATEN"
    return config


class CompiledDecoder:
    """`decode.decode_step` for one model, compiled (see the module docstring): `step(cache,
    token_B)` -> (logits (B, V), cache). `mode` says what ran: "compiled", or "eager" with
    `note` saying why. The weights are frozen into the program: build a new decoder after
    changing them."""

    def __init__(self, model: DBAModel, decode_block: int = 1024):
        self.model = model
        self.decode_block = decode_block
        self.mode = "compiled"
        self.note: str | None = None
        self.compile_s = 0.0
        if model.device.type not in ("cpu", "cuda"):
            self._fall_back(f"torch.compile has no backend for {model.device.type}")
        else:
            # Guards on the model's modules are skipped: its weights are constants of this
            # program, and checking every parameter each call cost ~0.3 ms of a ~2 ms step.
            self._fn = torch.compile(self._forward, fullgraph=True, dynamic=False,
                                     options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
            self._config = _inductor_config(model.device)

    def _forward(self, tokens_B1: torch.Tensor, cache: kvc.Cache) -> torch.Tensor:
        logits, _ = self.model.forward_cached(tokens_B1, cache, fresh=False, decode_block=self.decode_block,
                                              cache_attend=static_cached_attend)
        return logits[:, 0]

    def _fall_back(self, why: str) -> None:
        self.mode, self.note = "eager", why
        warnings.warn(f"compiled decode: {why}; decoding eagerly", stacklevel=3)

    def generate(self, prompt, **kwargs) -> torch.Tensor:
        """`sampling.generate(self.model, prompt, **kwargs)` with every new token through `step`."""
        from torch_ref.sampling import generate_with

        return generate_with(self, self.model, prompt, **kwargs)

    def step(self, cache: kvc.Cache, token_B: torch.Tensor) -> tuple[torch.Tensor, kvc.Cache]:
        """One new token per row, as `decode.decode_step`; the cache is updated in place."""
        pos = int(cache.pos)
        check_room(pos, 1, cache.max_len)
        if self.mode == "compiled":
            first = self.compile_s == 0.0
            t0 = time.perf_counter()
            cache.pos = torch.tensor(pos, device=token_B.device)
            try:
                from torch._inductor import config as inductor_config

                with torch.no_grad(), warnings.catch_warnings(), inductor_config.patch(self._config):
                    # Dynamo traces through the lru_cache of RoPE frequencies (constants here)
                    warnings.filterwarnings("ignore", message=".*lru_cache.*")
                    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # Inductor's own
                    logits = self._fn(token_B[:, None], cache)
                cache.pos = pos + 1
                if first:
                    self.compile_s = time.perf_counter() - t0
                return logits, cache
            except Exception as e:  # a lowering or codegen failure: the eager step still serves
                cache.pos = pos
                self._fall_back(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
        from torch_ref.decode import decode_step

        return decode_step(self.model, cache, token_B, decode_block=self.decode_block)
