"""ModelConfig: the v29 model configuration, validated, with presets and a parameter count.

Field names and defaults are v29's (SPEC §1) so a v29 checkpoint's `config` dict loads as is.
The fields after `dropout` are ours, each defaulting to what v29 does (so a v29 model is exactly
as before): `decoupled_scale` names the decoupled score scaling (SPEC §3); the options the
pretrained families need (SPEC §8) are the norm (`norm`, `norm_eps`: LayerNorm with weight and
bias, or RMSNorm), biases on the attention projections and the MLP (`qkv_bias`, `out_bias`,
`mlp_bias`), an untied output head (`tie_embeddings=False`: its own `lm_head.weight`), and the RoPE
frequencies (`rope_type="llama3"` with its factor, low/high frequency factors and original context).
A head dim other than d_model / n_head is gqa's `attn_dim / n_head` (q_proj is d_model -> attn_dim).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

ATTN_MODES = ("standard", "bottleneck", "decoupled", "gqa")
MLP_KINDS = ("swiglu", "gelu")
# per_path: q_sem.k_sem/sqrt(sem_hd) + q_geo.k_geo/sqrt(geo_hd) (the paper's formula).
# v29_sdpa: the same divided by sqrt(sem_hd + geo_hd), what v29 trained with when null_attn was off.
DECOUPLED_SCALES = ("per_path", "v29_sdpa")
NORMS = ("layernorm", "rmsnorm")
ROPE_TYPES = ("default", "llama3")  # llama3: Llama 3.1's frequency scaling (dba/rope.py)


class ConfigError(ValueError):
    """An invalid model configuration; the message names the field and the values."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    d_ff: int = 2048
    kv_head: int | None = None
    embed_dim: int = 512
    attn_mode: str = "bottleneck"
    attn_dim: int = 512
    sem_dim: int = 32
    geo_dim: int = 64
    rope: bool = True
    rope_base: float = 10000.0
    tie_qk: bool = False
    null_attn: bool = False
    learned_temp: bool = True
    mlp: str = "swiglu"
    dropout: float = 0.0
    decoupled_scale: str = "per_path"
    # -- options of the pretrained families (SPEC §8); the defaults are v29's model
    norm: str = "layernorm"  # layernorm (weight and bias) | rmsnorm (weight only)
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # biases on every query/key/value projection (Qwen2)
    out_bias: bool = False  # a bias on the attention's output projection
    mlp_bias: bool = False  # biases on the MLP's projections
    tie_embeddings: bool = True  # the output head is the token embedding; False: its own lm_head
    rope_type: str = "default"
    rope_factor: float = 8.0  # llama3: low frequencies are divided by this
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192  # llama3: the context the model was pretrained at
    # -- options of an upcycled student (dba upcycle); the defaults are v29's model
    decoupled_kv_head: int | None = None  # decoupled keys/values shared by groups of query heads
    # The RoPE frequencies of each layer's geometric heads, [n_layer][n_kv_head][geo head dim / 2]
    # (the teacher's frequencies a student inherited, per kv head); None: rope_type's table.
    rope_freqs: tuple[tuple[tuple[float, ...], ...], ...] | None = None

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived dimensions -------------------------------------------------------------
    @property
    def n_kv_head(self) -> int:
        """K/V heads: kv_head for gqa, decoupled_kv_head for decoupled, n_head otherwise (v29
        ignored kv_head outside gqa, so decoupled grouping is a field of its own)."""
        if self.attn_mode == "gqa" and self.kv_head is not None:
            return self.kv_head
        if self.attn_mode == "decoupled" and self.decoupled_kv_head is not None:
            return self.decoupled_kv_head
        return self.n_head

    @property
    def qk_dim(self) -> int:
        """Q width summed over heads (standard/bottleneck/gqa; decoupled: sem_dim + geo_dim)."""
        if self.attn_mode == "standard":
            return self.d_model
        if self.attn_mode == "decoupled":
            return self.sem_dim + self.geo_dim
        return self.attn_dim

    @property
    def v_dim(self) -> int:
        """V (and attention output) width summed over heads."""
        return self.d_model if self.attn_mode == "standard" else self.attn_dim

    @property
    def head_dim(self) -> int:
        """Q/K head dim for standard/bottleneck/gqa, V head dim for every mode."""
        return self.v_dim // self.n_head

    @property
    def sem_head_dim(self) -> int:
        return self.sem_dim // self.n_head

    @property
    def geo_head_dim(self) -> int:
        return self.geo_dim // self.n_head

    @property
    def rope_dim(self) -> int:
        """Rotated head dim: the geometric head dim (decoupled) or the whole Q/K head dim."""
        if self.attn_mode == "decoupled":
            return self.geo_head_dim
        return self.qk_dim // self.n_head

    def kv_streams(self) -> dict[str, int]:
        """Cached sequence tensors and their widths (SPEC §5)."""
        if self.attn_mode == "decoupled":
            k, h = self.n_kv_head, self.n_head
            return {"k_sem": self.sem_dim // h * k, "k_geo": self.geo_dim // h * k, "v": self.attn_dim // h * k}
        kv_width = self.n_kv_head * (self.qk_dim // self.n_head)
        return {"k": kv_width, "v": self.n_kv_head * self.head_dim}

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, v29: bool = False) -> "ModelConfig":
        """Build from a dict; `v29=True` treats it as a v29 payload (SPEC §3 scaling rule)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        d = dict(d)
        if isinstance(d.get("rope_freqs"), list):  # from JSON: nested lists -> a hashable table
            try:
                d["rope_freqs"] = tuple(tuple(tuple(head) for head in layer) for layer in d["rope_freqs"])
            except TypeError:
                raise ConfigError("rope_freqs must be a [n_layer][n_kv_head][geo head dim / 2] table of "
                                  "numbers") from None
        if v29 and "decoupled_scale" not in d:
            # v29 trained decoupled-without-null through SDPA's default scale (SPEC §3).
            plain = d.get("attn_mode", cls.attn_mode) == "decoupled" and not d.get("null_attn", False)
            d["decoupled_scale"] = "v29_sdpa" if plain else "per_path"
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Trainable parameters, each tied tensor counted once."""
        from dba.param_shapes import param_shapes, tied_aliases

        aliases = tied_aliases(self)
        return sum(math.prod(s) for k, s in param_shapes(self).items() if k not in aliases)


def path_scales(cfg: ModelConfig) -> tuple[float, ...]:
    """Multipliers folded into the query of each score path (one path unless decoupled), so that
    `q_cat . k_cat` is the SPEC §3 score and attention runs with scale 1."""
    if cfg.attn_mode != "decoupled":
        return (1.0 / math.sqrt(cfg.qk_dim // cfg.n_head),)
    ds, dg = cfg.sem_head_dim, cfg.geo_head_dim
    extra = 1.0 / math.sqrt(ds + dg) if cfg.decoupled_scale == "v29_sdpa" else 1.0
    return (extra / math.sqrt(ds), extra / math.sqrt(dg))


def key_streams(cfg: ModelConfig) -> tuple[str, ...]:
    """The cached key streams in the order their per-head slices are concatenated in q_cat/k_cat."""
    return ("k_sem", "k_geo") if cfg.attn_mode == "decoupled" else ("k",)


def _validate(c: ModelConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff", "embed_dim",
                 "attn_dim", "sem_dim", "geo_dim"):
        v = getattr(c, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
             f"{name} must be a positive integer, got {v!r}")
    need(c.attn_mode in ATTN_MODES, f"attn_mode must be one of {'|'.join(ATTN_MODES)}, got {c.attn_mode!r}")
    need(c.mlp in MLP_KINDS, f"mlp must be one of {'|'.join(MLP_KINDS)}, got {c.mlp!r}")
    need(c.decoupled_scale in DECOUPLED_SCALES,
         f"decoupled_scale must be one of {'|'.join(DECOUPLED_SCALES)}, got {c.decoupled_scale!r}")
    need(isinstance(c.dropout, (int, float)) and 0.0 <= c.dropout < 1.0,
         f"dropout must be in [0, 1), got {c.dropout!r}")
    need(isinstance(c.rope_base, (int, float)) and c.rope_base > 0,
         f"rope_base must be positive, got {c.rope_base!r}")
    need(c.norm in NORMS, f"norm must be one of {'|'.join(NORMS)}, got {c.norm!r}")
    need(isinstance(c.norm_eps, (int, float)) and 0 < c.norm_eps < 1, f"norm_eps must be in (0, 1), got {c.norm_eps!r}")
    need(c.rope_type in ROPE_TYPES, f"rope_type must be one of {'|'.join(ROPE_TYPES)}, got {c.rope_type!r}")
    if c.rope_type == "llama3":
        need(c.rope_factor > 0 and c.rope_low_freq_factor > 0 and c.rope_original_context > 0,
             f"llama3 RoPE needs positive factors and context, got factor={c.rope_factor!r}, "
             f"low_freq_factor={c.rope_low_freq_factor!r}, original_context={c.rope_original_context!r}")
        need(c.rope_high_freq_factor > c.rope_low_freq_factor,
             f"llama3 RoPE needs high_freq_factor > low_freq_factor, got {c.rope_high_freq_factor!r} <= "
             f"{c.rope_low_freq_factor!r}")
    if c.kv_head is not None:
        need(isinstance(c.kv_head, int) and not isinstance(c.kv_head, bool) and c.kv_head > 0,
             f"kv_head must be a positive integer or None, got {c.kv_head!r}")

    h = c.n_head
    need(c.d_model % h == 0, f"d_model={c.d_model} is not divisible by n_head={h}")
    if c.attn_mode != "standard":
        need(c.attn_dim % h == 0, f"attn_dim={c.attn_dim} is not divisible by n_head={h}")
    if c.attn_mode == "decoupled":
        need(c.sem_dim % h == 0, f"sem_dim={c.sem_dim} is not divisible by n_head={h}")
        need(c.geo_dim % h == 0, f"geo_dim={c.geo_dim} is not divisible by n_head={h}")
    if c.decoupled_kv_head is not None:
        k = c.decoupled_kv_head
        need(isinstance(k, int) and not isinstance(k, bool) and k > 0,
             f"decoupled_kv_head must be a positive integer or None, got {k!r}")
        need(c.attn_mode == "decoupled", f"decoupled_kv_head={k} needs attn_mode decoupled, got {c.attn_mode!r}")
        need(h % k == 0, f"n_head={h} is not divisible by decoupled_kv_head={k}")
        need(not (c.tie_qk and k != h), f"tie_qk is not possible when decoupled_kv_head={k} != n_head={h}")
    if c.rope_freqs is not None:
        _validate_rope_freqs(c, need)
    if c.attn_mode == "gqa" and c.kv_head is not None:
        need(h % c.kv_head == 0, f"n_head={h} is not divisible by kv_head={c.kv_head}")
        need(not (c.tie_qk and c.kv_head != h),
             f"tie_qk is not possible with gqa when kv_head={c.kv_head} != n_head={h}")
    if c.rope:
        need(c.rope_dim % 2 == 0,
             f"rope needs an even rotated head dim, got {c.rope_dim} "
             f"({'geo_dim' if c.attn_mode == 'decoupled' else 'qk width'}="
             f"{c.geo_dim if c.attn_mode == 'decoupled' else c.qk_dim} / n_head={h})")


def _validate_rope_freqs(c: ModelConfig, need) -> None:
    need(c.attn_mode == "decoupled" and c.rope,
         f"rope_freqs (recorded RoPE frequencies) need attn_mode decoupled with rope, got {c.attn_mode!r}, "
         f"rope={c.rope}")
    pairs, k = c.geo_dim // c.n_head // 2, c.n_kv_head
    table = c.rope_freqs
    shape_ok = (isinstance(table, tuple) and len(table) == c.n_layer
                and all(isinstance(layer, tuple) and len(layer) == k for layer in table)
                and all(isinstance(head, tuple) and len(head) == pairs for layer in table for head in layer))
    need(shape_ok, f"rope_freqs must be [n_layer={c.n_layer}][kv heads={k}][geo head dim / 2={pairs}] numbers")
    for layer in table:
        for head in layer:
            for f in head:
                need(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0,
                     f"rope_freqs must hold positive finite frequencies, got {f!r}")


# ---- presets (v29 --size / --exp, and dba's recipe) ----------------------------------------

# The model `dba train` trains with no model flags: ModelConfig's (v29's) defaults with these
# changes, a 1.05M-parameter decoupled model that trains on a 2-core CPU in minutes. The field
# defaults stay v29's, so a v29 payload or command line means what it meant there.
RECIPE: dict[str, Any] = dict(d_model=128, n_layer=4, n_head=4, d_ff=512, embed_dim=128, attn_mode="decoupled",
                              attn_dim=128)

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=512, n_layer=6, n_head=8, d_ff=2048, block_size=1024),
    "small": dict(d_model=768, n_layer=12, n_head=12, d_ff=3072, block_size=1024),
    "medium": dict(d_model=1024, n_layer=24, n_head=16, d_ff=4096, block_size=2048),
    "large": dict(d_model=1536, n_layer=24, n_head=16, d_ff=6144, block_size=2048),
    "1b": dict(d_model=2048, n_layer=18, n_head=16, d_ff=8192, block_size=2048),
}
# v29 lists bottleneck dims for tiny..large; 1b continues the same d_model*3/16 ratio.
_BOTTLENECK_DIM = {"tiny": 96, "small": 144, "medium": 192, "large": 288, "1b": 384}
_DECOUPLED_DIMS = {  # sem, geo, attn
    "tiny": (32, 64, 96), "small": (48, 96, 144), "medium": (64, 128, 192),
    "large": (96, 192, 288), "1b": (256, 512, 768),
}
_GQA_KV_HEAD = {"tiny": 2, "small": 3, "medium": 4, "large": 4, "1b": 4}

# What v29's --size also set when the flag was not typed: batch, steps, and the training
# sequence length (the preset's context).
SIZE_TRAINING: dict[str, dict[str, int]] = {
    name: {"batch_size": batch, "steps": steps, "train_seq_len": SIZES[name]["block_size"]}
    for name, batch, steps in (("tiny", 16, 6000), ("small", 8, 10000), ("medium", 4, 15000),
                               ("large", 2, 20000), ("1b", 1, 20000))
}

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "paper_baseline": dict(attn_mode="standard"),
    "paper_bottleneck": dict(attn_mode="bottleneck", null_attn=True),
    "paper_decoupled": dict(attn_mode="decoupled", tie_qk=True, null_attn=True, rope=True),
    "paper_gqa": dict(attn_mode="gqa"),
    # v29's fast decoupled recipe, its model part (some v29 versions also set precision and
    # optimizer flags; dba leaves those to the flags).
    "train_decoupled_fast": {"attn_mode": "decoupled", "tie_qk": True, "rope": True, "null_attn": False},
}
# v29's --exp paper_all: the four paper presets, trained one after another.
PAPER_ALL = "paper_all"
PAPER_EXPERIMENTS = ("paper_baseline", "paper_bottleneck", "paper_decoupled", "paper_gqa")


def size_fields(size: str, attn_mode: str) -> dict[str, Any]:
    """Fields set by a v29 `--size` preset for the given attention mode."""
    if size not in SIZES:
        raise ConfigError(f"unknown size preset {size!r}; choose from {'|'.join(SIZES)}")
    out: dict[str, Any] = dict(SIZES[size], embed_dim=SIZES[size]["d_model"])
    if attn_mode == "bottleneck":
        out["attn_dim"] = _BOTTLENECK_DIM[size]
    elif attn_mode == "decoupled":
        out["sem_dim"], out["geo_dim"], out["attn_dim"] = _DECOUPLED_DIMS[size]
    elif attn_mode == "gqa":
        out["attn_dim"] = out["d_model"]
        out["kv_head"] = _GQA_KV_HEAD[size]
    return out


def preset(size: str | None = None, exp: str | None = None, **overrides: Any) -> ModelConfig:
    """A config from v29's `--size` and `--exp` presets; explicit keyword overrides win."""
    fields_: dict[str, Any] = {}
    if exp is not None:
        if exp not in EXPERIMENTS:
            raise ConfigError(f"unknown experiment preset {exp!r}; choose from {'|'.join(EXPERIMENTS)}")
        fields_.update(EXPERIMENTS[exp])
    mode = overrides.get("attn_mode", fields_.get("attn_mode", ModelConfig.attn_mode))
    if size is not None:
        fields_.update(size_fields(size, mode))
    fields_.update(overrides)
    return ModelConfig.from_dict(fields_)
