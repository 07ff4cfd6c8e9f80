"""KV-cache policy, quantization block layout and memory accounting (SPEC §5, §6).

Framework-free: the JAX cache (`jax_model.kvcache`) and the torch cache (`torch_ref.kvcache`)
both hold a `StreamSpec` from here as their streams' static geometry and allocate the arrays
`storage_layout` names, and `kv_bytes` is the analytic figure that the bytes they really
allocate are tested against. The quantizers' constants and checks live here too, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dba.errors import UserError
from dba.flags import Flag, field_default, values
from dba.units import human_bytes  # noqa: F401 (SPEC §6's formatter, re-exported with the accounting)

if TYPE_CHECKING:
    import numpy as np

KV_KINDS = ("fp32", "fp16", "q8_0", "q4_0", "nf4")
QUANT_KINDS = ("q8_0", "q4_0", "nf4")
FOUR_BIT_KINDS = ("q4_0", "nf4")
DEFAULT_QBLOCK = 32

# QLoRA's NormalFloat-4 code book (SPEC §5), exactly as v29 lists it.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# Largest representable code magnitude: scale = absmax / this (nf4 codes live in [-1, 1]).
QMAX = {"q8_0": 127.0, "q4_0": 7.0, "nf4": 1.0}
# The largest finite fp16: the cap on a block's scale (fp16 storage), so dequantize stays finite.
FP16_MAX = 65504.0

# Key streams that may be stored rotated (`+rot`).
ROTATABLE = ("k", "k_sem", "k_geo")
# Streams each attention mode caches (names match ModelConfig.kv_streams()).
_MODE_STREAMS = {"decoupled": ("k_sem", "k_geo", "v")}
_DEFAULT_STREAMS = ("k", "v")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def require_quant(kind: str) -> None:
    """quantize/dequantize take the quantized kinds only (a ValueError: a programming mistake)."""
    if kind not in QUANT_KINDS:
        raise ValueError(f"quantize/dequantize handle {'|'.join(QUANT_KINDS)}, not {kind!r}")


def non_finite_message(x: np.ndarray) -> str:
    """One line naming how many NaN / +-Inf values `x` holds and where the first one is."""
    import numpy as np  # only on this error path: `dba` stays light to import

    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    first = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
    return (f"cannot quantize non-finite values ({nan} NaN, {inf} inf, first at index {first} of "
            f"shape {tuple(x.shape)}) into the KV cache")


def check_room(cached: int, new: int, max_len: int) -> None:
    """A one-line UserError when `new` more tokens do not fit a cache holding `cached` of max_len."""
    if cached + new > max_len:
        raise UserError(f"KV cache overflow: {cached} cached + {new} new tokens > max_len={max_len}")


# ---- block layout ------------------------------------------------------------------------

def quant_layout(kind: str, dim: int, qblock: int) -> tuple[int, int, int]:
    """(qb, pad_dim, n_blocks) for one stream: SPEC §5 "Effective block".

    For fp16/fp32 there is no blocking; we still return the numbers the rule gives so callers
    can print them, but nothing stores scales for those kinds.
    """
    if kind not in KV_KINDS:
        raise UserError(f"unknown KV cache kind {kind!r}; choose from {'|'.join(KV_KINDS)}")
    if not _is_int(dim) or dim <= 0:
        raise UserError(f"stream width must be a positive integer, got {dim!r}")
    if not _is_int(qblock) or qblock < 0:
        raise UserError(f"qblock must be an integer >= 0 (0 = default {DEFAULT_QBLOCK}), got {qblock!r}")
    qb = min(qblock if qblock > 0 else DEFAULT_QBLOCK, dim)
    if kind in FOUR_BIT_KINDS:
        # Two 4-bit codes share a byte, so a block must hold an even number of channels: the
        # largest even value <= qb and <= dim, but never below 2 (a 1-wide stream pads to 2).
        qb = min(qb, dim - dim % 2)
        qb = max(2, qb - qb % 2)
    pad_dim = -(-dim // qb) * qb
    if kind in FOUR_BIT_KINDS and pad_dim % 2:
        pad_dim += qb  # unreachable with an even qb; kept because the SPEC states it
    return qb, pad_dim, pad_dim // qb


@dataclass(frozen=True)
class StreamSpec:
    """Storage geometry of one cached sequence tensor (per token unless noted)."""

    name: str
    kind: str
    dim: int
    qblock_eff: int
    pad_dim: int
    n_blocks: int
    residual: int  # fp16 ring length; 0 for fp16/fp32 (and for residual=0)
    rotated: bool = False  # keys stored Hadamard-rotated per head (`+rot`); bytes unchanged

    @property
    def quantized(self) -> bool:
        return self.kind in QUANT_KINDS

    @property
    def payload_dim(self) -> int:
        """Stored payload bytes per token: int8[pad_dim] or packed uint8[pad_dim/2]."""
        return self.pad_dim // 2 if self.kind in FOUR_BIT_KINDS else self.pad_dim

    @property
    def bytes_per_token(self) -> int:
        """Bytes each token adds (ring excluded: it is a fixed cost)."""
        if self.kind == "fp32":
            return self.dim * 4
        if self.kind == "fp16":
            return self.dim * 2
        return self.payload_dim + self.n_blocks * 2


def stream_spec(name: str, kind: str, dim: int, qblock: int, residual: int,
                max_len: int | None = None, rotated: bool = False) -> StreamSpec:
    """The StreamSpec of a stream; the ring is `min(residual, max_len)` for quantized kinds."""
    qb, pad_dim, n_blocks = quant_layout(kind, dim, qblock)
    if not _is_int(residual) or residual < 0:
        raise UserError(f"residual must be an integer >= 0, got {residual!r}")
    ring = 0
    if kind in QUANT_KINDS:
        ring = residual if max_len is None else min(residual, max_len)
    return StreamSpec(name, kind, dim, qb, pad_dim, n_blocks, ring, bool(rotated))


def storage_layout(spec: StreamSpec, batch: int, max_len: int) -> dict[str, tuple[tuple[int, ...], str] | None]:
    """The arrays a preallocated stream holds, as {"data", "scale", "ring"} -> (shape, dtype name)
    or None when absent: `data` (B, max_len, dim) fp32/fp16 for plain kinds, else the quantized
    payload (B, max_len, pad_dim) int8 (q8_0) or (B, max_len, pad_dim//2) packed uint8 (4-bit);
    `scale` (B, max_len, n_blocks) fp16; `ring` (B, spec.residual, dim) fp16 when the spec has a
    window. `spec.residual` must already be clipped to max_len (`stream_spec(..., max_len=)`)."""
    if not spec.quantized:
        return {"data": ((batch, max_len, spec.dim), "float32" if spec.kind == "fp32" else "float16"),
                "scale": None, "ring": None}
    return {"data": ((batch, max_len, spec.payload_dim), "uint8" if spec.kind in FOUR_BIT_KINDS else "int8"),
            "scale": ((batch, max_len, spec.n_blocks), "float16"),
            "ring": ((batch, spec.residual, spec.dim), "float16") if spec.residual > 0 else None}


def stream_bytes(spec: StreamSpec, batch: int, seq_len: int) -> int:
    """Bytes of one preallocated sequence tensor of `seq_len` tokens (SPEC §6)."""
    b, s = batch, seq_len
    if spec.kind == "fp16":
        return b * s * spec.dim * 2
    if spec.kind == "fp32":
        return b * s * spec.dim * 4
    return b * s * spec.payload_dim + b * s * spec.n_blocks * 2 + b * min(spec.residual, s) * spec.dim * 2


# ---- policy ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVPolicy:
    """Cache kind per stream. None means "not overridden": fall back to `kind` / `qblock`.

    Overrides follow v29: `k` applies to standard/bottleneck/gqa, `k_sem`/`k_geo` to decoupled
    (v29 ignores `--kv-cache-k` for a decoupled model, and so do we). A per-stream qblock of 0
    also falls back to `qblock`, as v29's `q or kv_qblock` does.
    """

    kind: str = "fp16"
    qblock: int = DEFAULT_QBLOCK
    residual: int = 128
    k: str | None = None
    v: str | None = None
    k_sem: str | None = None
    k_geo: str | None = None
    qblock_k: int | None = None
    qblock_v: int | None = None
    qblock_k_sem: int | None = None
    qblock_k_geo: int | None = None
    rotate: tuple[str, ...] = ()  # key streams stored Hadamard-rotated per head (`k_sem=q4_0+rot`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotate", tuple(self.rotate))  # JSON gives a list
        for s in self.rotate:
            if s not in ROTATABLE:
                raise UserError(f"+rot applies to key streams ({', '.join(ROTATABLE)}), not {s!r}")
        if len(set(self.rotate)) != len(self.rotate):
            raise UserError(f"a stream is rotated twice: {', '.join(self.rotate)}")
        if self.kind not in KV_KINDS:
            raise UserError(f"unknown KV cache kind {self.kind!r}; choose from {'|'.join(KV_KINDS)}")
        for s in ("k", "v", "k_sem", "k_geo"):
            v = getattr(self, s)
            if v is not None and v not in KV_KINDS:
                raise UserError(f"unknown KV cache kind {v!r} for stream {s}; choose from {'|'.join(KV_KINDS)}")
        if not _is_int(self.qblock) or self.qblock < 0:
            raise UserError(f"kv qblock must be an integer >= 0 (0 = default {DEFAULT_QBLOCK}), got {self.qblock!r}")
        for s in ("k", "v", "k_sem", "k_geo"):
            v = getattr(self, f"qblock_{s}")
            if v is not None and (not _is_int(v) or v < 0):
                raise UserError(f"kv qblock for stream {s} must be an integer >= 0, got {v!r}")
        if not _is_int(self.residual) or self.residual < 0:
            raise UserError(f"kv residual must be an integer >= 0, got {self.residual!r}")

    # -- resolution
    def resolve(self, name: str, attn_mode: str) -> tuple[str, int]:
        """(kind, qblock) of stream `name` under attention mode `attn_mode`."""
        names = _MODE_STREAMS.get(attn_mode, _DEFAULT_STREAMS)
        if name not in names:
            raise UserError(f"attn_mode {attn_mode!r} caches streams {', '.join(names)}, not {name!r}")
        kind = getattr(self, name)
        if kind is None:
            kind = self.kind
            # v29's heterogeneous default: 4-bit semantic keys and values, but 8-bit RoPE'd keys.
            if name == "k_geo" and self.kind == "q4_0":
                kind = "q8_0"
        qblock = getattr(self, f"qblock_{name}") or self.qblock
        return kind, qblock

    def stream(self, name: str, cfg_or_mode: Any, dim: int | None = None,
               max_len: int | None = None) -> StreamSpec:
        """StreamSpec of `name` for a ModelConfig (width from the config) or a mode string
        (then `dim` is required)."""
        if isinstance(cfg_or_mode, str):
            mode = cfg_or_mode
            if dim is None:
                raise UserError("KVPolicy.stream with a mode string needs dim")
        else:
            mode = cfg_or_mode.attn_mode
            if dim is None:
                streams = cfg_or_mode.kv_streams()
                if name not in streams:
                    raise UserError(f"attn_mode {mode!r} caches streams {', '.join(streams)}, not {name!r}")
                dim = streams[name]
        kind, qblock = self.resolve(name, mode)
        rotated = name in self.rotate
        if rotated and kind not in QUANT_KINDS:
            raise UserError(f"+rot rotates keys before quantizing them; stream {name} is {kind} (use q8_0, q4_0 or nf4)")
        return stream_spec(name, kind, dim, qblock, self.residual, max_len, rotated)

    def check_for(self, cfg: Any) -> None:
        """Every stream of `cfg` can be built under this policy, and every rotated stream exists
        (kinds set for streams the mode does not cache are ignored, as v29 ignores them)."""
        streams = cfg.kv_streams()
        for s in self.rotate:
            if s not in streams:
                raise UserError(f"a {cfg.attn_mode} model caches {', '.join(streams)}; +rot names {s}")
        for s in streams:
            self.stream(s, cfg)
        from dba.rotation import rotation_dims

        rotation_dims(cfg, self)  # +rot needs power-of-two head dims

    # -- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KVPolicy":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown KV policy field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "KVPolicy":
        """From v29's flag names (the table `KV_FLAGS`: `kv_cache`, `kv_qblock`, `kv_residual`,
        `kv_cache_<stream>`, `kv_qblock_<stream>`) in a mapping; missing or None = default."""
        return cls(**values(KV_FLAGS, dict(flags)))


def _kv_flag(name: str, field: str, help: str) -> Flag:
    kind = "str" if field in ("kind", "k", "v", "k_sem", "k_geo") else "int"
    return Flag(name, kind, field_default(KVPolicy, field), help, KV_KINDS if kind == "str" else None, "kv", field)


# v29's cache-policy flags (dba sample, dba kv-mem, dba train's summary): the one declaration.
KV_FLAGS: tuple[Flag, ...] = (
    _kv_flag("kv_cache", "kind", "default kind of every stream"),
    _kv_flag("kv_qblock", "qblock", "quantization block in channels (0 = the default)"),
    _kv_flag("kv_residual", "residual", "fp16 window of the newest tokens (quantized kinds)"),
    *(_kv_flag(f"kv_cache_{s}", s, f"kind of the {s} stream (default: --kv-cache)") for s in ("k", "v", "k_sem", "k_geo")),
    *(_kv_flag(f"kv_qblock_{s}", f"qblock_{s}", f"quantization block of the {s} stream (default: --kv-qblock)")
      for s in ("k", "v", "k_sem", "k_geo")),
)


FP16 = KVPolicy()

POLICY_SYNTAX = """\
A cache policy is a comma-separated list. A bare kind (fp32, fp16, q8_0, q4_0, nf4) is the
default kind, as `--kv-cache KIND` (so a decoupled model's bare q4_0 keeps k_geo at q8_0, v29's
default); `hetero` is the same as q4_0. Then KEY=VALUE items: kind=, all= (the default kind and
every stream), k=, v=, k_sem=, k_geo= (one stream's kind; a key stream's kind may end in +rot:
Hadamard-rotated before quantizing), qblock=, qblock_k=, qblock_v=, qblock_k_sem=, qblock_k_geo=,
residual=. Example: k_sem=q4_0+rot,k_geo=q8_0,v=q4_0,residual=128,qblock=32."""


def parse_policy(text: str) -> KVPolicy:
    """A KVPolicy from the policy syntax above (POLICY_SYNTAX); a one-line UserError naming the
    bad item otherwise."""
    fields: dict[str, Any] = {}
    rotate: list[str] = []
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise UserError(f"empty cache policy {text!r}; e.g. q4_0 or k_sem=q4_0,k_geo=q8_0,v=q4_0")
    for item in items:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq:  # a bare kind
            key, value = "kind", ("q4_0" if key == "hetero" else key)
        if not key or not value:
            raise UserError(f"cache policy {text!r}: item {item!r} is not KEY=VALUE or a kind")
        if key in ("kind", "all", "k", "v", "k_sem", "k_geo"):
            kind, plus, extra = value.partition("+")
            if kind not in KV_KINDS:
                raise UserError(f"cache policy {text!r}: unknown kind {kind!r} (choose {'|'.join(KV_KINDS)})")
            if plus:
                if extra != "rot" or key not in ROTATABLE:
                    raise UserError(f"cache policy {text!r}: {item!r}: only key streams ({', '.join(ROTATABLE)}) "
                                    f"take a +rot suffix")
                rotate.append(key)
            if key == "all":  # k_geo is the one stream whose default is not the kind (v29's q4_0)
                fields.update(kind=kind, k_geo=kind)
            else:
                fields[key] = kind
        elif key in ("qblock", "residual") or key.startswith("qblock_"):
            try:
                fields[key] = int(value)
            except ValueError:
                raise UserError(f"cache policy {text!r}: {key} must be an integer, got {value!r}") from None
        else:
            raise UserError(f"cache policy {text!r}: unknown item {key!r} (see `dba eval --help`)")
    return KVPolicy.from_dict({**fields, "rotate": tuple(rotate)})


def policy_label(policy: KVPolicy, cfg: Any) -> str:
    """The policy as resolved for `cfg`, in the syntax above: each stream's kind, with its block
    when quantized, then the window when any stream is quantized (e.g. k_sem=q4_0/32,...)."""
    parts, quantized = [], False
    for name in cfg.kv_streams():
        spec = policy.stream(name, cfg)
        quantized |= spec.quantized
        parts.append(f"{name}={spec.kind}{'+rot' if spec.rotated else ''}" + (f"/{spec.qblock_eff}" if spec.quantized else ""))
    if quantized:
        parts.append(f"residual={policy.residual}")
    return ",".join(parts)


# ---- accounting --------------------------------------------------------------------------

def kv_bytes(cfg: Any, seq_len: int, batch: int = 1, policy: KVPolicy | None = None) -> dict[str, Any]:
    """Bytes of a whole-model cache preallocated for `seq_len` tokens (SPEC §6)."""
    if not _is_int(seq_len) or seq_len < 0:
        raise UserError(f"seq_len must be an integer >= 0, got {seq_len!r}")
    if not _is_int(batch) or batch <= 0:
        raise UserError(f"batch must be a positive integer, got {batch!r}")
    policy = FP16 if policy is None else policy
    details: dict[str, dict[str, Any]] = {}
    per_layer = 0
    for name, dim in cfg.kv_streams().items():
        spec = policy.stream(name, cfg, dim=dim, max_len=seq_len)
        nb = stream_bytes(spec, batch, seq_len)
        per_layer += nb
        details[name] = {"kind": spec.kind, "dim": spec.dim, "qblock": spec.qblock_eff,
                         "pad_dim": spec.pad_dim, "n_blocks": spec.n_blocks,
                         "residual": spec.residual, "bytes": nb}
    return {"total_bytes": per_layer * cfg.n_layer, "per_layer_bytes": per_layer, "details": details}


def baseline_bytes(cfg: Any, seq_len: int, batch: int = 1) -> dict[str, Any]:
    """The same model in `standard` mode with an fp16 cache (the seed's baseline); a student's
    grouped keys and recorded frequencies belong to decoupled attention and do not carry over."""
    return kv_bytes(cfg.replace(attn_mode="standard", decoupled_kv_head=None, rope_freqs=None), seq_len, batch, FP16)
