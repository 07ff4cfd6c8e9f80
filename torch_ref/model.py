"""The decoupled bottleneck transformer in plain PyTorch (SPEC §2–3), with v29's module names
so a v29 state dict loads with `strict=True`. Mirrors jax_model/model.py.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dba.config import ModelConfig, key_streams, path_scales
from dba.errors import UserError
from dba.kvspec import check_room
from dba.rope import layer_inv_freqs
from torch_ref import kvcache as kvc
from torch_ref.cached_attention import CacheAttend, cached_attend
from torch_ref.layers import apply_rope, attend, merge_heads, norm_layer, rope_cos_sin, split_heads
from torch_ref.layers import kv_heads as _kv_heads
from torch_ref.loss import cross_entropy


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        d, h, b = cfg.d_model, cfg.n_head, cfg.qkv_bias
        widths = cfg.kv_streams()  # key/value widths: kv heads x head dims
        if cfg.attn_mode == "decoupled":
            self.q_sem = nn.Linear(d, cfg.sem_dim, bias=b)
            self.k_sem = self.q_sem if cfg.tie_qk else nn.Linear(d, widths["k_sem"], bias=b)
            self.q_geo = nn.Linear(d, cfg.geo_dim, bias=b)
            self.k_geo = self.q_geo if cfg.tie_qk else nn.Linear(d, widths["k_geo"], bias=b)
            self.v_proj = nn.Linear(d, widths["v"], bias=b)
        else:
            self.q_proj = nn.Linear(d, cfg.qk_dim, bias=b)
            self.k_proj = self.q_proj if cfg.tie_qk else nn.Linear(d, widths["k"], bias=b)
            self.v_proj = nn.Linear(d, widths["v"], bias=b)
        self.out_proj = nn.Linear(cfg.v_dim, d, bias=cfg.out_bias)
        if cfg.learned_temp:
            self.logit_scale = nn.Parameter(torch.zeros(h))
        if cfg.null_attn:
            if cfg.attn_mode == "decoupled":  # one null key/value per kv head
                self.k_sem_null = nn.Parameter(torch.zeros(1, 1, widths["k_sem"]))
                self.k_geo_null = nn.Parameter(torch.zeros(1, 1, widths["k_geo"]))
                self.v_null = nn.Parameter(torch.zeros(1, 1, widths["v"]))
            else:
                self.k_null = nn.Parameter(torch.zeros(1, 1, widths["k"]))
                self.v_null = nn.Parameter(torch.zeros(1, 1, widths["v"]))
        self.scales = path_scales(cfg)
        self.key_names = key_streams(cfg)
        # RoPE frequencies of the queries and of the keys: None (the default), one row, or a row
        # per head (recorded frequencies)
        self.inv_freq_q, self.inv_freq_k = layer_inv_freqs(cfg, layer)

    # -- the pieces every path (full forward, prefill, decode) shares ----------------------
    def _rope(self, x_BHTD: torch.Tensor, positions: torch.Tensor, inv_freq) -> torch.Tensor:
        if not self.cfg.rope:
            return x_BHTD
        cos, sin = rope_cos_sin(self.cfg.rope_dim, self.cfg.rope_base, positions, inv_freq)
        return apply_rope(x_BHTD, cos, sin)

    def queries_and_kv(self, x_BTC: torch.Tensor,
                       positions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(q_cat (B, H, T, Dqk): rotated, scaled per path and by the learned temperature; the
        cached streams for these tokens, name -> (B, T, width), keys stored after RoPE)."""
        h, h_kv = self.cfg.n_head, self.cfg.n_kv_head
        if self.cfg.attn_mode == "decoupled":
            q_sem = split_heads(self.q_sem(x_BTC), h) * self.scales[0]
            q_geo = self._rope(split_heads(self.q_geo(x_BTC), h), positions, self.inv_freq_q) * self.scales[1]
            q = torch.cat([q_sem, q_geo], dim=-1)
            k_geo = self._rope(split_heads(self.k_geo(x_BTC), h_kv), positions, self.inv_freq_k)
            kv = {"k_sem": self.k_sem(x_BTC), "k_geo": merge_heads(k_geo), "v": self.v_proj(x_BTC)}
        else:
            q = self._rope(split_heads(self.q_proj(x_BTC), h), positions, self.inv_freq_q) * self.scales[0]
            k = self._rope(split_heads(self.k_proj(x_BTC), h_kv), positions, self.inv_freq_k)
            kv = {"k": merge_heads(k), "v": self.v_proj(x_BTC)}
        if self.cfg.learned_temp:
            q = q * self.logit_scale.exp().to(q.dtype)[None, :, None, None]
        return q, kv

    def kv_heads(self, streams: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Streams (B, L, width) -> k_cat, v (B, K, L, D) over the K kv-heads (no repetition)."""
        return _kv_heads(streams, self.key_names, self.cfg.n_kv_head)

    def null_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The null key (H, Dqk) and value (H, Dv), or None without null attention."""
        if not self.cfg.null_attn:
            return None
        h, h_kv = self.cfg.n_head, self.cfg.n_kv_head
        if self.cfg.attn_mode == "decoupled":
            k = torch.cat([self.k_sem_null.view(h_kv, -1), self.k_geo_null.view(h_kv, -1)], dim=-1)
        else:
            k = self.k_null.view(h_kv, -1)
        v = self.v_null.view(h_kv, -1)
        if h_kv != h:
            k, v = k.repeat_interleave(h // h_kv, dim=0), v.repeat_interleave(h // h_kv, dim=0)
        return k, v

    def forward(self, x_BTC: torch.Tensor, positions: torch.Tensor, cache: kvc.LayerCache | None = None, *,
                fresh: bool = False, decode_block: int = 1024,
                cache_attend: CacheAttend = cached_attend) -> tuple[torch.Tensor, kvc.LayerCache | None]:
        """(B, T, d_model) at absolute `positions` -> (output (B, T, d_model), cache).

        Without a cache: causal attention over x's own K/V (training, the full forward), with
        dropout in training mode. With a layer cache holding `cache.pos` tokens: x's K/V are
        written at cache.pos (in place) and x attends over its own fresh, unquantized K/V when
        `fresh` (the cache held nothing before: v29's order for a prompt), else over what the
        cache returns (`cache_attend`, a function with `cached_attend`'s signature, e.g. a fused
        kernel: `decode_block` keys at a time); returns the cache holding pos + T.
        """
        q, kv = self.queries_and_kv(x_BTC, positions)
        p = self.cfg.dropout if self.training and cache is None else 0.0
        if cache is None:
            k, v = self.kv_heads(kv)
            y = attend(q, k.to(q.dtype), v, self.null_kv(), dropout_p=p)
        else:
            end = cache.pos + x_BTC.shape[1]
            for name, s in cache.streams.items():
                kvc.write(s, kv[name], cache.pos)
            if fresh:
                k, v = self.kv_heads(kv)
                y = attend(q, k.to(q.dtype), v, self.null_kv())
            else:
                y = cache_attend(q, cache.streams, cache.pos, end, self.null_kv(), n_kv_head=self.cfg.n_kv_head,
                                 key_names=self.key_names, decode_block=decode_block)
            cache = kvc.LayerCache(cache.streams, end)
        y = self.out_proj(merge_heads(y))
        return (F.dropout(y, p=p) if p > 0.0 else y), cache


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.dropout, b = cfg.mlp, cfg.dropout, cfg.mlp_bias
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=b)
        if cfg.mlp == "swiglu":
            self.w2 = nn.Linear(cfg.d_model, cfg.d_ff, bias=b)
            self.w3 = nn.Linear(cfg.d_ff, cfg.d_model, bias=b)
        else:
            self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            y = self.w3(F.silu(self.w1(x)) * self.w2(x))
        else:
            y = self.w2(F.gelu(self.w1(x)))  # exact (erf) GELU, torch's default
        return F.dropout(y, p=self.dropout, training=self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.ln1 = norm_layer(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ln2 = norm_layer(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.ff = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: kvc.LayerCache | None = None, *,
                fresh: bool = False, decode_block: int = 1024,
                cache_attend: CacheAttend = cached_attend) -> tuple[torch.Tensor, kvc.LayerCache | None]:
        """Pre-LN block; the layer cache goes through `Attention` (see there) and comes back."""
        y, cache = self.attn(self.ln1(x), positions, cache, fresh=fresh, decode_block=decode_block,
                             cache_attend=cache_attend)
        x = x + y
        return x + self.ff(self.ln2(x)), cache


class DBAModel(nn.Module):
    """`model(tokens)` -> logits (B, T, V) in fp32 for a full causal forward.

    Every path walks the same blocks (`_trunk`): the full forward and the loss without a cache,
    prefill, prompt chunks and decode through `forward_cached` with one (`decode` and `sampling`
    reach no further into the model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        if cfg.embed_dim != cfg.d_model:
            self.emb_in = nn.Linear(cfg.embed_dim, cfg.d_model, bias=False)
            self.emb_out = nn.Linear(cfg.d_model, cfg.embed_dim, bias=False)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = norm_layer(cfg.norm, cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:  # an output head of its own (V, embed_dim), like the embedding
            self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        # Norms keep (1, 0); logit_scale and null parameters were created as zeros.

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def as_tokens(self, tokens) -> torch.Tensor:
        """Token ids as an int64 (B, T) tensor on the model's device; 1-D ids become one row. A
        one-line UserError naming the shape and dtype for anything but integer ids shaped (T,) or
        (B, T)."""
        if not torch.is_tensor(tokens):
            tokens = np.asarray(tokens)
            if tokens.ndim in (1, 2) and np.issubdtype(tokens.dtype, np.integer):
                tokens = tokens.astype(np.int64, copy=False)  # uint16/uint32 ids: torch lacks them
        t = torch.as_tensor(tokens, device=self.device)
        if t.dim() == 1:
            t = t[None]
        integer = not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)
        if t.dim() != 2 or not integer:
            raise UserError(f"tokens must be integer ids shaped (B, T), got shape {tuple(t.shape)} "
                            f"dtype {str(t.dtype).removeprefix('torch.')}")
        return t.long()

    def embed(self, idx_BT: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx_BT)
        return self.emb_in(x) if self.cfg.embed_dim != self.cfg.d_model else x

    def unembed(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x = self.ln_f(x_BTC)
        if self.cfg.embed_dim != self.cfg.d_model:
            x = self.emb_out(x)
        head = self.tok_emb.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return torch.matmul(x, head.t()).float()

    def _trunk(self, idx_BT: torch.Tensor, cache: kvc.Cache | None = None, *, fresh: bool = False,
               decode_block: int = 1024,
               cache_attend: CacheAttend = cached_attend) -> tuple[torch.Tensor, kvc.Cache | None]:
        """Embedding and blocks: features (B, T, d_model) and the cache (None without one)."""
        start = 0 if cache is None else cache.pos
        # start may be a 0-d tensor (torch_ref.compiled_decode: one program for every position)
        positions = start + torch.arange(idx_BT.shape[1], device=idx_BT.device)
        x = self.embed(idx_BT)
        layers = []
        for i, block in enumerate(self.blocks):
            x, layer = block(x, positions, None if cache is None else cache.layer(i), fresh=fresh,
                             decode_block=decode_block, cache_attend=cache_attend)
            layers.append(layer)
        return x, (None if cache is None else cache.with_layers(layers))

    def forward_cached(self, tokens_BT: torch.Tensor, cache: kvc.Cache | None, *, fresh: bool = False,
                       decode_block: int = 1024, last_only: bool = False,
                       cache_attend: CacheAttend = cached_attend) -> tuple[torch.Tensor, kvc.Cache | None]:
        """Tokens (B, T) ids through the blocks and `cache` -> (logits (B, T, V) fp32, or (B, 1, V)
        for the last position only with `last_only`; the cache holding T more tokens: the same
        object, updated in place).

        The one cached path of prefill, prompt chunks and decode (see `Attention` for `fresh`,
        `decode_block` and `cache_attend`, which the decode functions pick from their `kv_fused`),
        run without autograd; with cache=None it is the full causal forward and returns
        (logits, None). An overflow of the cache is refused with a UserError.
        """
        if cache is not None and not torch.is_tensor(cache.pos):  # a tensor position: the caller checked
            check_room(cache.pos, tokens_BT.shape[1], cache.max_len)
        with torch.no_grad() if cache is not None else nullcontext():
            x, cache = self._trunk(tokens_BT, cache, fresh=fresh, decode_block=decode_block, cache_attend=cache_attend)
            return self.unembed(x[:, -1:] if last_only else x), cache

    def forward(self, tokens) -> torch.Tensor:
        """Logits (B, T, V) fp32 of the full causal forward (no cache)."""
        return self.unembed(self._trunk(self.as_tokens(tokens))[0])

    def loss(self, tokens, targets) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32) of the full forward."""
        return cross_entropy(self(tokens), self.as_tokens(targets))
