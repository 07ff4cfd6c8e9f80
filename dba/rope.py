"""RoPE inverse frequencies other than the default (framework-free): the table both frameworks
rotate with when `ModelConfig.rope_type` is not "default".

The default, inv_freq[i] = 1 / base^(2i/r), is computed by each framework itself
(`layers.rope_cos_sin`), exactly as before. Llama 3.1's scaling (`rope_type="llama3"`, SPEC §8,
transformers' `_compute_llama3_parameters`) starts from the same frequencies and, by wavelength
2*pi/inv_freq against the pretraining context `orig`:
    wavelength < orig / high_freq_factor   unchanged (high frequencies: local position)
    wavelength > orig / low_freq_factor    divided by `factor`
    otherwise                              (1 - s) * inv_freq / factor + s * inv_freq,
                                           s = (orig / wavelength - low) / (high - low)
computed in float32 as transformers does; the attention scaling stays 1.

An upcycled student records its frequencies (`ModelConfig.rope_freqs`): each layer's kv heads
rotate their geometric pairs at the teacher's frequencies they kept, a table per head
(`layer_inv_freqs`); a query head uses its kv head's table, so q.k sees one rotation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def default_inv_freq(rot_dim: int, base: float) -> np.ndarray:
    """1 / base^(2i / rot_dim), float32."""
    return (np.float32(1.0) / (np.float32(base) ** (np.arange(0, rot_dim, 2, dtype=np.float32) / np.float32(rot_dim))))


def llama3_inv_freq(rot_dim: int, base: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_context: int) -> np.ndarray:
    inv = default_inv_freq(rot_dim, base)
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv)
    smooth = (np.float32(original_context) / wavelen - np.float32(low_freq_factor)) / np.float32(
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq_table(cfg: Any) -> tuple[float, ...] | None:
    """The model's RoPE frequencies (rot_dim / 2 float32 values as Python floats, hashable for a
    jitted model) when its rope_type is not the default; None for the default (each framework
    computes those itself)."""
    if not cfg.rope or cfg.rope_type == "default":
        return None
    if cfg.rope_type == "llama3":
        inv = llama3_inv_freq(cfg.rope_dim, cfg.rope_base, cfg.rope_factor, cfg.rope_low_freq_factor,
                              cfg.rope_high_freq_factor, cfg.rope_original_context)
        return tuple(float(x) for x in inv)
    raise ValueError(f"rope_type {cfg.rope_type!r}")


Table = tuple[float, ...] | tuple[tuple[float, ...], ...]


def layer_inv_freqs(cfg: Any, layer: int) -> tuple[Table | None, Table | None]:
    """(the queries' table, the keys' table) of one layer: None for the default frequencies, one
    row shared by every head (rope_type), or a row per head (recorded frequencies: the keys' K
    rows, the queries' H rows, query head h using kv head h // (H / K))."""
    if cfg.rope_freqs is None:
        shared = inv_freq_table(cfg)
        return shared, shared
    keys = cfg.rope_freqs[layer]
    group = cfg.n_head // cfg.n_kv_head
    return tuple(row for row in keys for _ in range(group)), keys
