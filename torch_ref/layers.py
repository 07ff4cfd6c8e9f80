"""RoPE and the one score function every attention path uses (SPEC §3).

Every attention mode is reduced to plain scaled-dot-product form before the softmax: queries
carry the per-path scale and the learned temperature, keys of the decoupled paths are
concatenated, so `q_cat . k_cat` *is* the SPEC score and attention runs with scale 1.
Mirrors jax_model/layers.py.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def rope_cos_sin(rot_dim: int, base: float, positions: torch.Tensor,
                 inv_freq: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, rot_dim/2) for absolute positions, computed in fp32. `inv_freq`: the
    frequencies when they are not the default 1 / base^(2i/rot_dim) (dba/rope.py's table): one
    row, or a row per head, which gives per-head tables (heads, T, rot_dim/2)."""
    freqs = _inv_freq(rot_dim, float(base), inv_freq, positions.device)
    angles = positions.to(torch.float32)[:, None] * freqs[..., None, :]
    return angles.cos(), angles.sin()


@functools.lru_cache(maxsize=256)
def _inv_freq(rot_dim: int, base: float, inv_freq: tuple | None, device: torch.device) -> torch.Tensor:
    """The frequencies rope_cos_sin multiplies positions by, made once per (layer table, device):
    decode asks for them every token in every layer. Never written to (callers only read)."""
    if inv_freq is None:
        return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
    return torch.tensor(inv_freq, dtype=torch.float32, device=device)


class RMSNorm(torch.nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back before the weight
    (transformers' LlamaRMSNorm order, SPEC §8)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def norm_layer(kind: str, dim: int, eps: float) -> torch.nn.Module:
    """The model's norm: LayerNorm (weight and bias) or RMSNorm (weight)."""
    return torch.nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else RMSNorm(dim, eps)


def apply_rope(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Split-halves rotation of the whole last dim: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    half = x_BHTD.shape[-1] // 2
    x1, x2 = x_BHTD[..., :half].float(), x_BHTD[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x_BHTD.dtype)


def hadamard(x: torch.Tensor, n: int) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform of every n-channel slice of the last dim (n a
    power of two dividing it): x @ H_n per head, H_n the Sylvester matrix. The same butterfly
    stages as jax_model.layers.hadamard (exact a+b, a-b, pairs 1, 2, 4, ... apart): same bits."""
    lead, w = x.shape[:-1], x.shape[-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, w // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(*lead, w)
        h *= 2
    return x


def split_heads(x_BTW: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H*hd) -> (B, H, T, hd): heads are contiguous slices."""
    b, t, w = x_BTW.shape
    return x_BTW.view(b, t, n_heads, w // n_heads).transpose(1, 2)


def merge_heads(x_BHTD: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x_BHTD.shape
    return x_BHTD.transpose(1, 2).reshape(b, t, h * d)


def kv_heads(streams: dict[str, torch.Tensor], key_names: tuple[str, ...],
             n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Streams (B, L, width) -> k_cat, v (B, K, L, D) over the K kv-heads (no repetition): each
    head's slices of the key streams `key_names` concatenated in that order, as in q_cat."""
    keys = [split_heads(streams[name], n_kv) for name in key_names]
    k = keys[0] if len(keys) == 1 else torch.cat(keys, dim=-1)
    return k, split_heads(streams["v"], n_kv)


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """Bool (Tq, Tk): query i (at absolute position t_k - t_q + i) sees keys <= its position."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)
    return torch.arange(t_k, device=device)[None, :] <= q_pos[:, None]


# Under torch.compile on a CPU, attention over at most this many keys with heads at most this wide
# is written out (scores, mask, fp32 softmax, P @ V) for Inductor to fuse: the CPU flash-attention
# kernel behind SDPA, made for heads of 64+, spent 50 of a 207 ms config A step (heads of 4 + 8
# query/key channels) and the written-out form runs the step ~10% faster. Longer sequences keep
# SDPA, which never holds the (T, T) scores.
_WRITTEN_OUT_MAX_KEYS, _WRITTEN_OUT_MAX_HEAD_DIM = 1024, 32


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
          dropout_p: float) -> torch.Tensor:
    """F.scaled_dot_product_attention with scale 1, or its written-out form (see above)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    if not (torch.compiler.is_compiling() and q.device.type == "cpu" and t_k <= _WRITTEN_OUT_MAX_KEYS
            and max(q.shape[-1], v.shape[-1]) <= _WRITTEN_OUT_MAX_HEAD_DIM):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                              scale=1.0)
    if is_causal:
        mask = causal_mask(t_q, t_k, q.device)
    s = torch.matmul(q, k.transpose(-1, -2))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        p = F.dropout(p, p=dropout_p)
    return torch.matmul(p, v)


def attend(q_BHTD: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor,
           null_kv: tuple[torch.Tensor, torch.Tensor] | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention with scale 1 (the scale lives in q) over K/V with K kv-heads; for gqa
    (K < H) each kv-head is repeated for its H/K query heads here (not SDPA's `enable_gqa`,
    which torch < 2.5 lacks).

    With null attention one extra never-masked key and value sit in front of the real ones: SDPA
    over [null, keys] with the causal mask shifted by that column (PyTorch's fused CPU/GPU
    kernels, where a written-out softmax would materialize every (T, T) score in fp32 and copy it
    once more to prepend the null column).
    """
    group = q_BHTD.shape[1] // k_BKLD.shape[1]
    if group > 1:
        k_BKLD, v_BKLD = k_BKLD.repeat_interleave(group, dim=1), v_BKLD.repeat_interleave(group, dim=1)
    k_BHLD, v_BHLD = k_BKLD, v_BKLD
    t_q, t_k = q_BHTD.shape[2], k_BHLD.shape[2]
    if null_kv is None:
        if t_q == t_k:
            return _sdpa(q_BHTD, k_BHLD, v_BHLD, None, True, dropout_p)
        return _sdpa(q_BHTD, k_BHLD, v_BHLD, causal_mask(t_q, t_k, q_BHTD.device), False, dropout_p)
    k_null_HD, v_null_HD = null_kv
    b, h = q_BHTD.shape[:2]
    k_all = torch.cat([k_null_HD.to(k_BHLD.dtype)[None, :, None, :].expand(b, h, 1, -1), k_BHLD], dim=2)
    v_all = torch.cat([v_null_HD.to(v_BHLD.dtype)[None, :, None, :].expand(b, h, 1, -1), v_BHLD], dim=2)
    mask = torch.cat([torch.ones((t_q, 1), dtype=torch.bool, device=q_BHTD.device),
                      causal_mask(t_q, t_k, q_BHTD.device)], dim=1)
    return _sdpa(q_BHTD, k_all, v_all, mask, False, dropout_p)
