"""The decoupled bottleneck transformer in plain PyTorch (SPEC §2–3), with v29's module names
so a v29 state dict loads with `strict=True`. Mirrors jax_model/model.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dba.config import ModelConfig
from torch_ref.layers import apply_rope, attend, merge_heads, path_scales, rope_cos_sin, split_heads


def default_device() -> torch.device:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.d_model, cfg.n_head
        if cfg.attn_mode == "decoupled":
            self.q_sem = nn.Linear(d, cfg.sem_dim, bias=False)
            self.k_sem = self.q_sem if cfg.tie_qk else nn.Linear(d, cfg.sem_dim, bias=False)
            self.q_geo = nn.Linear(d, cfg.geo_dim, bias=False)
            self.k_geo = self.q_geo if cfg.tie_qk else nn.Linear(d, cfg.geo_dim, bias=False)
            self.v_proj = nn.Linear(d, cfg.attn_dim, bias=False)
        else:
            widths = cfg.kv_streams()
            self.q_proj = nn.Linear(d, cfg.qk_dim, bias=False)
            self.k_proj = self.q_proj if cfg.tie_qk else nn.Linear(d, widths["k"], bias=False)
            self.v_proj = nn.Linear(d, widths["v"], bias=False)
        self.out_proj = nn.Linear(cfg.v_dim, d, bias=False)
        if cfg.learned_temp:
            self.logit_scale = nn.Parameter(torch.zeros(h))
        if cfg.null_attn:
            if cfg.attn_mode == "decoupled":
                self.k_sem_null = nn.Parameter(torch.zeros(1, 1, cfg.sem_dim))
                self.k_geo_null = nn.Parameter(torch.zeros(1, 1, cfg.geo_dim))
                self.v_null = nn.Parameter(torch.zeros(1, 1, cfg.attn_dim))
            else:
                self.k_null = nn.Parameter(torch.zeros(1, 1, widths["k"]))
                self.v_null = nn.Parameter(torch.zeros(1, 1, widths["v"]))
        self.scales = path_scales(cfg)

    # -- the pieces every path (full forward, prefill, decode) shares ----------------------
    def _rope(self, x_BHTD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.cfg.rope:
            return x_BHTD
        cos, sin = rope_cos_sin(self.cfg.rope_dim, self.cfg.rope_base, positions)
        return apply_rope(x_BHTD, cos, sin)

    def queries(self, x_BTC: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q_cat (B, H, T, Dqk): rotated, scaled per path and by the learned temperature."""
        h = self.cfg.n_head
        if self.cfg.attn_mode == "decoupled":
            q_sem = split_heads(self.q_sem(x_BTC), h) * self.scales[0]
            q_geo = self._rope(split_heads(self.q_geo(x_BTC), h), positions) * self.scales[1]
            q = torch.cat([q_sem, q_geo], dim=-1)
        else:
            q = self._rope(split_heads(self.q_proj(x_BTC), h), positions) * self.scales[0]
        if self.cfg.learned_temp:
            q = q * self.logit_scale.exp().to(q.dtype)[None, :, None, None]
        return q

    def new_kv(self, x_BTC: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached streams for these tokens, (B, T, width) each; keys stored after RoPE."""
        h_kv = self.cfg.n_kv_head
        if self.cfg.attn_mode == "decoupled":
            k_geo = self._rope(split_heads(self.k_geo(x_BTC), h_kv), positions)
            return {"k_sem": self.k_sem(x_BTC), "k_geo": merge_heads(k_geo), "v": self.v_proj(x_BTC)}
        k = self._rope(split_heads(self.k_proj(x_BTC), h_kv), positions)
        return {"k": merge_heads(k), "v": self.v_proj(x_BTC)}

    def kv_heads(self, streams: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Streams (B, L, width) -> k_cat, v (B, H, L, D), K/V heads repeated for gqa."""
        h_kv = self.cfg.n_kv_head
        if self.cfg.attn_mode == "decoupled":
            k = torch.cat([split_heads(streams["k_sem"], h_kv), split_heads(streams["k_geo"], h_kv)], dim=-1)
        else:
            k = split_heads(streams["k"], h_kv)
        v = split_heads(streams["v"], h_kv)
        group = self.cfg.n_head // h_kv
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return k, v

    def null_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The null key (H, Dqk) and value (H, Dv), or None without null attention."""
        if not self.cfg.null_attn:
            return None
        h, h_kv = self.cfg.n_head, self.cfg.n_kv_head
        if self.cfg.attn_mode == "decoupled":
            k = torch.cat([self.k_sem_null.view(h, -1), self.k_geo_null.view(h, -1)], dim=-1)
        else:
            k = self.k_null.view(h_kv, -1)
        v = self.v_null.view(h_kv, -1)
        if h_kv != h:
            k, v = k.repeat_interleave(h // h_kv, dim=0), v.repeat_interleave(h // h_kv, dim=0)
        return k, v

    def forward(self, x_BTC: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q = self.queries(x_BTC, positions)
        k, v = self.kv_heads(self.new_kv(x_BTC, positions))
        p = self.cfg.dropout if self.training else 0.0
        y = attend(q, k.to(q.dtype), v, self.null_kv(), dropout_p=p)
        return F.dropout(self.out_proj(merge_heads(y)), p=p, training=self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.dropout = cfg.mlp, cfg.dropout
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        if cfg.mlp == "swiglu":
            self.w2 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.w3 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        else:
            self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            y = self.w3(F.silu(self.w1(x)) * self.w2(x))
        else:
            y = self.w2(F.gelu(self.w1(x)))  # exact (erf) GELU, torch's default
        return F.dropout(y, p=self.dropout, training=self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.ff = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), positions)
        return x + self.ff(self.ln2(x))


class DBAModel(nn.Module):
    """`model(tokens)` -> logits (B, T, V) in fp32 for a full causal forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        if cfg.embed_dim != cfg.d_model:
            self.emb_in = nn.Linear(cfg.embed_dim, cfg.d_model, bias=False)
            self.emb_out = nn.Linear(cfg.d_model, cfg.embed_dim, bias=False)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        # LayerNorm keeps (1, 0); logit_scale and null parameters were created as zeros.

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def as_tokens(self, tokens) -> torch.Tensor:
        t = torch.as_tensor(tokens, device=self.device)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.dtype.is_floating_point:
            raise ValueError(f"tokens must be integer ids shaped (B, T), got {tuple(t.shape)} {t.dtype}")
        return t.long()

    def embed(self, idx_BT: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx_BT)
        return self.emb_in(x) if self.cfg.embed_dim != self.cfg.d_model else x

    def unembed(self, x_BTC: torch.Tensor) -> torch.Tensor:
        x = self.ln_f(x_BTC)
        if self.cfg.embed_dim != self.cfg.d_model:
            x = self.emb_out(x)
        return torch.matmul(x, self.tok_emb.weight.t()).float()

    def forward(self, tokens) -> torch.Tensor:
        idx = self.as_tokens(tokens)
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, positions)
        return self.unembed(x)

    def loss(self, tokens, targets) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.as_tokens(targets).reshape(-1))

    def decode_logits(self, tokens, prefill: int, policy=None, decode_block: int = 1024,
                      max_len: int | None = None) -> torch.Tensor:
        """Teacher-forced cached decode: prefill `prefill` tokens, then one token at a time."""
        from torch_ref.decode import decode_logits

        return decode_logits(self, tokens, prefill=prefill, policy=policy, decode_block=decode_block, max_len=max_len)
