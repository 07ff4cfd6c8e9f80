"""The cases JAX and torch are compared on: tiny, prime-ish configurations, random non-trivial
weights, and models of both frameworks built from them. Shared by `parity_tests/` and the parity
report (`python -m bench.parity`), so the report measures exactly what the tests check."""

from __future__ import annotations

import itertools
import math

import numpy as np

from dba.config import ModelConfig
from dba.weights import param_shapes, tied_aliases

# Prime-ish sizes catch transposed or mis-split heads: 6 heads; head dims 10 (qk), 6 (v),
# 3 (sem), 4 (geo); vocab 101; d_ff 74; embed 46 when the lexical bottleneck is on.
BASE = dict(vocab_size=101, block_size=32, n_layer=2, n_head=6, d_model=60, d_ff=74, embed_dim=60,
            attn_dim=36, sem_dim=18, geo_dim=24)
OPTIONS = {
    "tie_qk": dict(tie_qk=True),
    "null": dict(null_attn=True),
    "norope": dict(rope=False),
    "notemp": dict(learned_temp=False),
    "gelu": dict(mlp="gelu"),
    "embed": dict(embed_dim=46),
    # the pretrained families' options (SPEC §8): RMSNorm, biases, an untied head, Llama-3 RoPE
    # (an original context of 8 puts the 10- and 4-wide rotations' frequencies in all three bands)
    "rms": dict(norm="rmsnorm", norm_eps=1e-6),
    "bias": dict(qkv_bias=True, out_bias=True, mlp_bias=True),
    "untied": dict(tie_embeddings=False),
    "llama3": dict(rope_type="llama3", rope_factor=4.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_context=8),
}
# An upcycled student's options (decoupled only): keys/values shared by groups of 3 query heads, and
# recorded per-layer, per-kv-head RoPE frequencies (a fixed table spanning four decades).
DECOUPLED_OPTIONS = {
    "grouped": dict(decoupled_kv_head=2),
    "recorded": dict(rope_freqs="recorded"),  # the table is made for the config's layers and kv heads
}
DECOUPLED_COMBOS = [("grouped",), ("recorded",), ("grouped", "recorded", "null", "rms", "bias", "untied")]
COMBOS = [(), ("tie_qk",), ("null",), ("norope",), ("notemp",), ("gelu",), ("embed",),
          ("tie_qk", "null", "gelu", "embed"), ("null", "norope", "notemp"), ("rms", "bias", "untied", "llama3"),
          ("rms", "tie_qk", "bias", "notemp")]


def make_config(mode: str, options=(), **overrides) -> ModelConfig:
    fields = dict(BASE, attn_mode=mode)
    for o in options:
        fields.update(OPTIONS[o] if o in OPTIONS else DECOUPLED_OPTIONS[o])
    if mode == "gqa":
        fields["kv_head"] = 6 if fields.get("tie_qk") else 2
    fields.update(overrides)
    if fields.get("rope_freqs") == "recorded":
        fields["rope_freqs"] = recorded_freqs(ModelConfig(**{**fields, "rope_freqs": None}))
    return ModelConfig(**fields)


def recorded_freqs(cfg: ModelConfig, seed: int = 7) -> tuple:
    """A [n_layer][kv heads][geo head dim / 2] table of frequencies in [1e-3, 10), each exactly a
    float32 (as a student's, taken from its teacher's float32 table)."""
    pairs = cfg.geo_dim // cfg.n_head // 2
    f = 10.0 ** np.random.default_rng(seed).uniform(-3, 1, (cfg.n_layer, cfg.n_kv_head, pairs))
    return tuple(tuple(tuple(float(x) for x in head) for head in layer) for layer in f.astype(np.float32))


def config_matrix() -> list[tuple[str, ModelConfig]]:
    """Every attention mode x each v29 option alone, two combinations of them, and two of the
    pretrained families' options (44 configs), then the upcycled student's options: grouped
    decoupled keys, recorded frequencies, both with the families' options (3 more)."""
    out = []
    for mode, combo in itertools.product(("standard", "bottleneck", "decoupled", "gqa"), COMBOS):
        out.append((f"{mode}-{'+'.join(combo) or 'base'}", make_config(mode, combo)))
    for combo in DECOUPLED_COMBOS:
        out.append((f"decoupled-{'+'.join(combo)}", make_config("decoupled", combo)))
    return out


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical weights with every parameter non-trivial (LayerNorm, logit_scale, nulls too),
    scaled so logits are of order 1."""
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("logit_scale"):
            a = rng.normal(0.0, 0.3, shape)
        elif "_null" in name:
            a = rng.normal(0.0, 0.5, shape)
        elif ".ln" in name or name.startswith("ln_f"):
            a = (1.0 if name.endswith("weight") else 0.0) + rng.normal(0.0, 0.1, shape)
        elif name.endswith(".bias"):
            a = rng.normal(0.0, 0.1, shape)
        elif name in ("tok_emb.weight", "lm_head.weight"):
            a = rng.normal(0.0, 1.0 / math.sqrt(shape[1]), shape) * 1.5
        else:  # Linear [out, in]
            a = rng.normal(0.0, 1.0 / math.sqrt(shape[1]), shape) * 0.7
        state[name] = a.astype(np.float32)
    for k, q in tied_aliases(cfg).items():
        state[k] = state[q]
    return state


def random_tokens(cfg: ModelConfig, batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int64)


def build_torch(cfg: ModelConfig, state):
    import torch_ref

    m = torch_ref.DBAModel(cfg)
    torch_ref.load_canonical(m, state)
    return m.eval()


def build_jax(cfg: ModelConfig, state, **kw):
    import jax_model

    m = jax_model.DBAModel(cfg, **kw)
    return jax_model.load_canonical(m, state)


def init_like_state(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights at the scale v29 initialises and early training keeps (Linear std 0.03), with
    non-trivial LayerNorm, temperature and null parameters; logits of order 1.

    Cached-decode parity uses this regime: JAX and torch matmuls differ by ~1e-7, which now and
    then lands a K/V element on the other side of an fp16 or quantisation rounding boundary; the
    logit change from one such flip grows with the activations, so O(1)-sized K/V (the other
    regime) measures flip luck rather than the decode algorithm.
    """
    state = random_state(cfg, seed)
    rng = np.random.default_rng(seed + 1000)
    for name, a in state.items():
        if name == "tok_emb.weight":
            state[name] = rng.normal(0.0, 0.1, a.shape).astype(np.float32)
        elif a.ndim == 2:
            state[name] = rng.normal(0.0, 0.03, a.shape).astype(np.float32)
    for k, q in tied_aliases(cfg).items():
        state[k] = state[q]
    return state


def jax_grads_canonical(model, tokens, targets) -> tuple[float, dict[str, np.ndarray]]:
    """(loss, gradients under canonical names) of the JAX model's mean cross-entropy."""
    from flax import nnx

    import jax_model

    def loss_fn(m):
        return jax_model.cross_entropy(m.forward(tokens), targets)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return float(loss), jax_model.canonical_state(nnx.merge(graphdef, grads, rest))


def grad_errors(cfg: ModelConfig, torch_grads: dict[str, np.ndarray],
                jax_grads: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Per canonical tensor, max |torch - JAX| over max |torch| of its gradient. Tied aliases are
    left out; a bias whose gradient is zero by construction maps to None once both frameworks
    give zero up to rounding (1e-6 of the largest gradient), since a ratio of roundings means
    nothing: q.(k + b) without RoPE shifts every score of a query by q.b, which softmax ignores."""
    aliases = tied_aliases(cfg)
    top = max(float(np.abs(torch_grads[k]).max()) for k in jax_grads if k not in aliases)
    out: dict[str, float | None] = {}
    for key, g_j in jax_grads.items():
        if key in aliases:
            continue
        g_t = torch_grads[key]
        scale = float(np.abs(g_t).max())
        unrotated = key.endswith("k_sem.bias") or (key.endswith("k_proj.bias") and not cfg.rope)
        if unrotated and not cfg.null_attn and not cfg.tie_qk:
            if scale > 1e-6 * top or float(np.abs(g_j).max()) > 1e-6 * top:
                raise AssertionError(f"{key}: a softmax-invariant bias has a gradient ({scale:.2e}, top {top:.2e})")
            out[key] = None
            continue
        if scale == 0:
            raise AssertionError(f"{key}: no gradient in torch")
        out[key] = float(np.abs(g_t - g_j).max()) / scale
    return out
