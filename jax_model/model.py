"""The decoupled bottleneck transformer in Flax NNX (SPEC §2–3). Mirrors torch_ref/model.py.

Parameters live in `param_dtype`; matmuls run in `dtype` (fp32, or bf16 for mixed precision)
while LayerNorm, softmax, the residual stream, logits and the loss stay fp32.

The math is in `layers` (RoPE, heads, scores); how it is computed fast lives beside it: every
matmul goes through `fast_matmul.dense`/`dense_t` (2-D operands, a backward on XLA:CPU's fast
matmul path), fresh attention through `attention_kernels.attend`, the loss through
`loss.linear_cross_entropy` (fused with the output projection). The attention's projections of
one input run as one matmul over the concatenated kernels (the parameters stay separate, so
names and checkpoints are unchanged).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dba.config import ModelConfig, key_streams, path_scales
from dba.errors import UserError
from dba.kvspec import check_room
from dba.rope import layer_inv_freqs
from jax_model import kvcache as kvc
from jax_model.attention_kernels import INFERENCE_CHUNKS, attend
from jax_model.cached_attention import CacheAttend, cached_attend
from jax_model.fast_matmul import dense, dense_t
from jax_model.layers import apply_rope, merge_heads, rope_cos_sin, split_heads
from jax_model.layers import kv_heads as _kv_heads
from jax_model.loss import linear_cross_entropy

_init = nnx.initializers.normal(stddev=0.02)
_FEW_ROWS = 16  # up to this many tokens the attention projections run as separate matmuls


class Linear(nnx.Linear):
    """nnx.Linear computed by `fast_matmul.dense` (plus its bias, when it has one); the same
    `kernel` and `bias` parameters, the same results."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        y = dense(x, kernel)
        return y if bias is None else y + bias


def _linear(rngs: nnx.Rngs, dtype, param_dtype, bias: bool = False):
    """A Linear of the model: N(0, 0.02) weights, zero biases (v29's and transformers' inits)."""
    return partial(Linear, use_bias=bias, kernel_init=_init, bias_init=nnx.initializers.zeros_init(),
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs, param_dtype) -> nnx.Module:
    """The model's norm, computed in fp32: LayerNorm (weight and bias) or RMSNorm (weight)."""
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 layer: int = 0):
        self.cfg = cfg
        d, h = cfg.d_model, cfg.n_head
        linear = _linear(rngs, dtype, param_dtype, cfg.qkv_bias)
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))  # noqa: E731
        widths = cfg.kv_streams()  # key/value widths: kv heads x head dims
        if cfg.attn_mode == "decoupled":
            self.q_sem = linear(d, cfg.sem_dim)
            self.k_sem = None if cfg.tie_qk else linear(d, widths["k_sem"])
            self.q_geo = linear(d, cfg.geo_dim)
            self.k_geo = None if cfg.tie_qk else linear(d, widths["k_geo"])
            self.v_proj = linear(d, widths["v"])
        else:
            self.q_proj = linear(d, cfg.qk_dim)
            self.k_proj = None if cfg.tie_qk else linear(d, widths["k"])
            self.v_proj = linear(d, widths["v"])
        self.out_proj = _linear(rngs, dtype, param_dtype, cfg.out_bias)(cfg.v_dim, d)
        self.logit_scale = zeros(h) if cfg.learned_temp else None
        if cfg.null_attn:
            if cfg.attn_mode == "decoupled":  # one null key/value per kv head
                self.k_sem_null = zeros(1, 1, widths["k_sem"])
                self.k_geo_null = zeros(1, 1, widths["k_geo"])
                self.v_null = zeros(1, 1, widths["v"])
            else:
                self.k_null = zeros(1, 1, widths["k"])
                self.v_null = zeros(1, 1, widths["v"])
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None
        self.scales = path_scales(cfg)
        self.key_names = key_streams(cfg)
        # RoPE frequencies of the queries and of the keys: None (the default), one row, or a row
        # per head (recorded frequencies); tuples, static when jitted
        self.inv_freq_q, self.inv_freq_k = layer_inv_freqs(cfg, layer)

    # tie_qk: the K projection *is* the Q projection (one weight, gradients summed).
    def _k(self, name: str) -> nnx.Linear:
        mod = getattr(self, name)
        return mod if mod is not None else getattr(self, "q" + name[1:])

    def _project(self, x_BTC: jax.Array, names: tuple[str, ...]) -> list[jax.Array]:
        """The named projections of x, (B, T, width) each, as one matmul over the concatenated
        kernels (one big matmul beats several thin ones, forward and backward). A tied K is the
        Q projection: computed once."""
        mods = [self._k(n) if n[0] == "k" else getattr(self, n) for n in names]
        uniq = list({id(m): m for m in mods}.values())
        if x_BTC.size // x_BTC.shape[-1] <= _FEW_ROWS:
            # Decode: a matrix-vector product reads each weight once either way, and the
            # concatenated copy of the kernels would cost more than the products themselves.
            y = {id(m): m(x_BTC) for m in uniq}
            return [y[id(m)] for m in mods]
        lin = uniq[0]
        kernels = [m.kernel[...] for m in uniq]
        biases = [m.bias[...] for m in uniq if m.bias is not None]  # all or none (cfg.qkv_bias)
        x, *params = lin.promote_dtype((x_BTC, *kernels, *biases), dtype=lin.dtype)
        kernels, biases = params[:len(kernels)], params[len(kernels):]
        y = dense(x, kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1))
        if biases:
            y = y + (biases[0] if len(biases) == 1 else jnp.concatenate(biases))
        bounds, at = {}, 0
        for m in uniq:
            bounds[id(m)] = (at, at + m.out_features)
            at += m.out_features
        return [y[..., bounds[id(m)][0]:bounds[id(m)][1]] for m in mods]

    def _rope(self, x_BHTD: jax.Array, positions: jax.Array, inv_freq) -> jax.Array:
        if not self.cfg.rope:
            return x_BHTD
        cos, sin = rope_cos_sin(self.cfg.rope_dim, self.cfg.rope_base, positions, inv_freq)
        return apply_rope(x_BHTD, cos, sin)

    # -- the pieces every path (full forward, prefill, decode) shares ----------------------
    def _queries(self, proj: list[jax.Array], positions: jax.Array) -> jax.Array:
        h = self.cfg.n_head
        if self.cfg.attn_mode == "decoupled":
            q_sem_BTW, q_geo_BTW = proj
            q_sem = split_heads(q_sem_BTW, h) * self.scales[0]
            q_geo = self._rope(split_heads(q_geo_BTW, h), positions, self.inv_freq_q) * self.scales[1]
            q = jnp.concatenate([q_sem, q_geo], axis=-1)
        else:
            q = self._rope(split_heads(proj[0], h), positions, self.inv_freq_q) * self.scales[0]
        if self.logit_scale is not None:
            q = q * jnp.exp(self.logit_scale[...].astype(jnp.float32)).astype(q.dtype)[None, :, None, None]
        return q

    def _new_kv(self, proj: list[jax.Array], positions: jax.Array) -> dict[str, jax.Array]:
        h_kv = self.cfg.n_kv_head
        if self.cfg.attn_mode == "decoupled":
            k_sem, k_geo, v = proj
            k_geo = self._rope(split_heads(k_geo, h_kv), positions, self.inv_freq_k)
            return {"k_sem": k_sem, "k_geo": merge_heads(k_geo), "v": v}
        k, v = proj
        return {"k": merge_heads(self._rope(split_heads(k, h_kv), positions, self.inv_freq_k)), "v": v}

    def _names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if self.cfg.attn_mode == "decoupled":
            return ("q_sem", "q_geo"), ("k_sem", "k_geo", "v_proj")
        return ("q_proj",), ("k_proj", "v_proj")

    def queries_and_kv(self, x_BTC: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(q_cat (B, H, T, Dqk): rotated, scaled per path and by the learned temperature; the
        cached streams for these tokens, name -> (B, T, width), keys stored after RoPE), with all
        projections in one matmul."""
        q_names, kv_names = self._names()
        proj = self._project(x_BTC, q_names + kv_names)
        return self._queries(proj[:len(q_names)], positions), self._new_kv(proj[len(q_names):], positions)

    def kv_heads(self, streams: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Streams (B, L, width) -> k_cat, v (B, K, L, D) over the K kv-heads (no repetition)."""
        return _kv_heads(streams, self.key_names, self.cfg.n_kv_head)

    def null_kv(self) -> tuple[jax.Array, jax.Array] | None:
        """The null key (H, Dqk) and value (H, Dv) per query head, or None."""
        if not self.cfg.null_attn:
            return None
        h, h_kv = self.cfg.n_head, self.cfg.n_kv_head
        if self.cfg.attn_mode == "decoupled":
            k = jnp.concatenate([self.k_sem_null[...].reshape(h_kv, -1), self.k_geo_null[...].reshape(h_kv, -1)],
                                axis=-1)
        else:
            k = self.k_null[...].reshape(h_kv, -1)
        v = self.v_null[...].reshape(h_kv, -1)
        if h_kv != h:
            k, v = jnp.repeat(k, h // h_kv, axis=0), jnp.repeat(v, h // h_kv, axis=0)
        return k, v

    def __call__(self, x_BTC: jax.Array, positions: jax.Array, cache: kvc.LayerCache | None = None, *,
                 deterministic: bool = True, fresh: bool = False, decode_block: int = 1024,
                 cache_attend: CacheAttend = cached_attend) -> tuple[jax.Array, kvc.LayerCache | None]:
        """(B, T, d_model) at absolute `positions` -> (output (B, T, d_model), cache).

        Without a cache: causal attention over x's own K/V (training, the full forward), with
        dropout unless `deterministic`. With a layer cache holding `cache.pos` tokens: x's K/V are
        written at cache.pos and x attends over its own fresh, unquantized K/V when `fresh` (the
        cache held nothing before: v29's order for a prompt), else over what the cache returns
        (`cache_attend`, a function with `cached_attend`'s signature, e.g. a fused kernel:
        `decode_block` keys at a time); returns the cache holding pos + T.
        """
        q, kv = self.queries_and_kv(x_BTC, positions)  # all projections in one matmul
        drop = None
        if cache is None:
            if self.dropout is not None and not deterministic:
                drop = partial(self.dropout, deterministic=False)
            k, v = self.kv_heads(kv)
            y = attend(q, k, v, self.null_kv(), dropout=drop)
        else:
            end = cache.pos + x_BTC.shape[1]
            streams = {name: kvc.write(s, kv[name], cache.pos) for name, s in cache.streams.items()}
            if fresh:
                k, v = self.kv_heads(kv)
                y = attend(q, k, v, self.null_kv(), n_chunks=INFERENCE_CHUNKS)
            else:
                y = cache_attend(q, streams, cache.pos, end, self.null_kv(), n_kv_head=self.cfg.n_kv_head,
                                 key_names=self.key_names, decode_block=decode_block)
            cache = cache.replace(streams=streams, pos=end)
        y = self.out_proj(merge_heads(y))
        return (drop(y) if drop is not None else y), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        linear = _linear(rngs, dtype, param_dtype, cfg.mlp_bias)
        self.kind = cfg.mlp
        self.w1 = linear(cfg.d_model, cfg.d_ff)
        if cfg.mlp == "swiglu":
            self.w2 = linear(cfg.d_model, cfg.d_ff)
            self.w3 = linear(cfg.d_ff, cfg.d_model)
        else:
            self.w2 = linear(cfg.d_ff, cfg.d_model)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.kind == "swiglu":
            y = self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))
        else:
            y = self.w2(jax.nn.gelu(self.w1(x), approximate=False))  # exact erf GELU, as v29
        if self.dropout is not None and not deterministic:
            y = self.dropout(y, deterministic=False)
        return y


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 layer: int = 0):
        self.ln1 = _norm(cfg, rngs, param_dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, layer=layer)
        self.ln2 = _norm(cfg, rngs, param_dtype)
        self.ff = MLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: kvc.LayerCache | None = None, *,
                 deterministic: bool = True, fresh: bool = False, decode_block: int = 1024,
                 cache_attend: CacheAttend = cached_attend) -> tuple[jax.Array, kvc.LayerCache | None]:
        """Pre-LN block; the layer cache goes through `Attention` (see there) and comes back."""
        y, cache = self.attn(self.ln1(x), positions, cache, deterministic=deterministic, fresh=fresh,
                             decode_block=decode_block, cache_attend=cache_attend)
        x = x + y.astype(jnp.float32)
        return x + self.ff(self.ln2(x), deterministic).astype(jnp.float32), cache


class DBAModel(nnx.Module):
    """`model(tokens)` -> logits (B, T, V) in fp32 for a full causal forward (jitted per shape).

    Every path walks the same blocks (`_trunk`): the full forward and the loss without a cache,
    prefill, prompt chunks and decode through `forward_cached` with one (`decode` and `sampling`
    reach no further into the model)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg = cfg
        self.dtype, self.param_dtype, self.remat = dtype, param_dtype, remat
        linear = _linear(rngs, dtype, param_dtype)
        self.tok_emb = nnx.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=_init, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        bottleneck = cfg.embed_dim != cfg.d_model
        self.emb_in = linear(cfg.embed_dim, cfg.d_model) if bottleneck else None
        self.emb_out = linear(cfg.d_model, cfg.embed_dim) if bottleneck else None
        self.blocks = nnx.List([Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, layer=i)
                                for i in range(cfg.n_layer)])
        self.ln_f = _norm(cfg, rngs, param_dtype)
        # an output head of its own (V, embed_dim), laid out like the embedding
        self.lm_head = None if cfg.tie_embeddings else nnx.Embed(
            cfg.vocab_size, cfg.embed_dim, embedding_init=_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def embed(self, idx_BT: jax.Array) -> jax.Array:
        x = self.tok_emb(idx_BT)
        if self.emb_in is not None:
            x = self.emb_in(x)
        return x.astype(jnp.float32)

    def _head_operands(self, x_BTC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(final features (B, T, E), the output head (V, E): the tied embedding or lm_head), both
        in the compute dtype."""
        x = self.ln_f(x_BTC)
        if self.emb_out is not None:
            x = self.emb_out(x)
        head = self.tok_emb if self.lm_head is None else self.lm_head
        return x.astype(self.dtype), head.embedding[...].astype(self.dtype)

    def unembed(self, x_BTC: jax.Array) -> jax.Array:
        return dense_t(*self._head_operands(x_BTC))  # (B, T, V) fp32

    def _trunk(self, idx_BT: jax.Array, cache: kvc.Cache | None = None, *, deterministic: bool = True,
               fresh: bool = False, decode_block: int = 1024,
               cache_attend: CacheAttend = cached_attend) -> tuple[jax.Array, kvc.Cache | None]:
        """Embedding and blocks: features (B, T, d_model) fp32 and the cache (None without one)."""
        t = idx_BT.shape[1]
        positions = jnp.arange(t) if cache is None else cache.pos + jnp.arange(t)
        x = self.embed(idx_BT)
        layers = []
        for i, block in enumerate(self.blocks):
            if cache is None and self.remat:
                x = nnx.remat(lambda blk, h: blk(h, positions, deterministic=deterministic)[0])(block, x)
                continue
            x, layer = block(x, positions, None if cache is None else cache.layer(i),
                             deterministic=deterministic, fresh=fresh, decode_block=decode_block,
                             cache_attend=cache_attend)
            layers.append(layer)
        return x, (None if cache is None else cache.with_layers(layers))

    def forward_cached(self, tokens_BT: jax.Array, cache: kvc.Cache | None, *, fresh: bool = False,
                       decode_block: int = 1024, last_only: bool = False,
                       cache_attend: CacheAttend = cached_attend) -> tuple[jax.Array, kvc.Cache | None]:
        """Tokens (B, T) int32 through the blocks and `cache` -> (logits (B, T, V) fp32, or (B, 1, V)
        for the last position only with `last_only`; the cache holding T more tokens).

        The one cached path of prefill, prompt chunks and decode (see `Attention` for `fresh`,
        `decode_block` and `cache_attend`, which the decode functions pick from their `kv_fused`);
        with cache=None it is the full causal forward and returns (logits, None).
        Traced, it trusts the cache to have room (checked by the host-side `decode` wrappers);
        called eagerly it refuses an overflow with a UserError.
        """
        if cache is not None and not isinstance(cache.pos, jax.core.Tracer):
            check_room(int(cache.pos), tokens_BT.shape[1], cache.max_len)
        x, cache = self._trunk(tokens_BT, cache, fresh=fresh, decode_block=decode_block, cache_attend=cache_attend)
        if last_only:  # generation needs only the next-token logits, not the prompt's
            x = x[:, -1:]
        return self.unembed(x), cache

    def forward(self, idx_BT: jax.Array, deterministic: bool = True) -> jax.Array:
        """The un-jitted forward, for use inside other transforms (train step, grads)."""
        return self.unembed(self._trunk(idx_BT, deterministic=deterministic)[0])

    def loss(self, idx_BT: jax.Array, targets_BT: jax.Array, deterministic: bool = True) -> jax.Array:
        """Mean next-token cross-entropy (fp32) of the un-jitted forward: the same value as
        `cross_entropy(forward(idx), targets)`, with the output projection and the loss fused
        (`linear_cross_entropy`) so training never keeps a separate (B, T, V) gradient."""
        x, emb = self._head_operands(self._trunk(idx_BT, deterministic=deterministic)[0])
        return linear_cross_entropy(x.reshape(-1, x.shape[-1]), emb, targets_BT.reshape(-1))

    def as_tokens(self, tokens) -> jax.Array:
        """Token ids as an int32 (B, T) array; 1-D ids become one row. A one-line UserError naming
        the shape and dtype for anything but integer ids shaped (T,) or (B, T)."""
        idx = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
        if idx.ndim == 1:
            idx = idx[None]
        if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
            raise UserError(f"tokens must be integer ids shaped (B, T), got shape {tuple(idx.shape)} "
                            f"dtype {np.dtype(idx.dtype).name}")
        return jnp.asarray(idx, jnp.int32)

    def __call__(self, tokens, deterministic: bool = True) -> jax.Array:
        return _jit_forward(self, self.as_tokens(tokens), deterministic)


@nnx.jit(static_argnums=(2,))
def _jit_forward(model: DBAModel, idx_BT: jax.Array, deterministic: bool) -> jax.Array:
    return model.forward(idx_BT, deterministic)
