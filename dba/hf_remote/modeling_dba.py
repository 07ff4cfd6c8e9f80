"""dba's decoupled bottleneck attention transformer as a Hugging Face transformers causal LM
(`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`).

Written by `dba convert SRC DIR` beside `configuration_dba.py` and `model.safetensors`. It needs
torch and transformers only (not dba), and computes the model of dba's SPEC §2-3 with every
option of dba's ModelConfig:

- attention modes `standard`, `bottleneck`, `gqa` (K/V heads shared by n_head / kv_head query
  heads, repeat-interleaved) and `decoupled` (a semantic Q/K path without RoPE and a geometric
  one with it; score = q_sem.k_sem / sqrt(sem_hd) + q_geo.k_geo / sqrt(geo_hd), further divided
  by sqrt(sem_hd + geo_hd) under `decoupled_scale="v29_sdpa"`);
- `tie_qk` (K is computed with the Q projection: one weight), `null_attn` (one learned key/value
  in front of the real keys, never rotated or masked), `learned_temp` (every query head times
  exp(logit_scale[h]) after RoPE);
- the lexical bottleneck (token embeddings of `embed_dim` with `emb_in` / `emb_out` when it is not
  d_model), an output head tied to the embedding or its own `lm_head`;
- SwiGLU `w3(silu(w1 x) * w2 x)` or GELU `w2(gelu(w1 x))` (exact erf), LayerNorm (weight and
  bias) or RMSNorm (computed in fp32, cast back, then times the weight), optional biases;
- RoPE on split halves with absolute positions, angles in fp32, default frequencies
  1 / base^(2i/r) or Llama 3.1's scaled ones (`rope_type="llama3"`);
- an upcycled student's options: decoupled keys/values shared by groups of query heads
  (`decoupled_kv_head`, one null key/value per kv head) and recorded per-layer, per-kv-head RoPE
  frequencies (`rope_freqs`; query head i rotates with its kv head's row).

The state-dict names are dba's canonical names (`tok_emb.weight`, `blocks.0.attn.q_sem.weight`,
...), so model.safetensors holds exactly dba's tensors; under tie_qk only the Q projection exists.

There is no key/value cache: every forward computes the whole sequence it is given, and
`prepare_inputs_for_generation` hands `generate()` the whole sequence at every step, so
generation is correct and uncached (quadratic in the length; `dba sample` is the fast path).
An `attention_mask` with padding is honoured: padded keys are never attended, and positions
count the real tokens only (left padding gives each row the positions it has alone).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dba import DBAConfig


# ---- dimensions (SPEC §3) -------------------------------------------------------------------------

def _dims(c):
    """The model's widths from its config: K/V heads (gqa's kv_head, decoupled's
    decoupled_kv_head, else n_head) and the widths of every projection."""
    h = c.n_head
    n_kv = h
    if c.attn_mode == "gqa" and c.kv_head:
        n_kv = c.kv_head
    elif c.attn_mode == "decoupled" and getattr(c, "decoupled_kv_head", None):
        n_kv = c.decoupled_kv_head
    if c.attn_mode == "standard":
        qk, v = c.d_model, c.d_model
    elif c.attn_mode == "decoupled":
        qk, v = c.sem_dim + c.geo_dim, c.attn_dim
    else:
        qk, v = c.attn_dim, c.attn_dim
    rope_dim = c.geo_dim // h if c.attn_mode == "decoupled" else qk // h
    return dict(n_kv=n_kv, qk=qk, v=v, qk_hd=qk // h, v_hd=v // h, rope_dim=rope_dim,
                k_width=n_kv * (qk // h), v_width=n_kv * (v // h),
                k_sem_width=n_kv * (c.sem_dim // h), k_geo_width=n_kv * (c.geo_dim // h))


def rope_inv_freq(c, device=None):
    """RoPE inverse frequencies (rope_dim / 2,), float32: 1 / base^(2i/r), or Llama 3.1's scaling of
    them by wavelength against the original context (high frequencies kept, low ones divided by
    `factor`, a smooth blend between)."""
    r = _dims(c)["rope_dim"]
    inv = 1.0 / (c.rope_base ** (torch.arange(0, r, 2, dtype=torch.float32, device=device) / r))
    if c.rope_type == "default":
        return inv
    orig, low, high, factor = (float(c.rope_original_context), float(c.rope_low_freq_factor),
                               float(c.rope_high_freq_factor), float(c.rope_factor))
    wavelen = (2 * math.pi) / inv
    scaled = torch.where(wavelen > orig / low, inv / factor, inv)
    s = (orig / wavelen - low) / (high - low)
    smoothed = (1 - s) * scaled / factor + s * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x, positions, inv_freq):
    """Split-halves RoPE of the last dim of x (B, H, T, r) at `positions` (B|1, T): (x1, x2) ->
    (x1 cos - x2 sin, x1 sin + x2 cos), angles = position x frequency, all in fp32. `inv_freq`:
    (r/2,) for every head, or (H, r/2), a row per head."""
    pos = positions.float()[:, None, :, None]  # (B, 1, T, 1)
    angles = pos * (inv_freq[None, None, None, :] if inv_freq.dim() == 1 else inv_freq[None, :, None, :])
    cos, sin = angles.cos(), angles.sin()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class DBARMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def _norm(c):
    if c.norm == "rmsnorm":
        return DBARMSNorm(c.d_model, c.norm_eps)
    return nn.LayerNorm(c.d_model, eps=c.norm_eps)


class DBAAttention(nn.Module):
    def __init__(self, c, layer=0):
        super().__init__()
        self.c, self.dims = c, _dims(c)
        d, h, b, dims = c.d_model, c.n_head, c.qkv_bias, self.dims
        # recorded RoPE frequencies of this layer's kv heads (a row each), or None: the config's
        self.key_freqs = c.rope_freqs[layer] if getattr(c, "rope_freqs", None) else None
        if c.attn_mode == "decoupled":
            self.q_sem = nn.Linear(d, c.sem_dim, bias=b)
            self.q_geo = nn.Linear(d, c.geo_dim, bias=b)
            if not c.tie_qk:
                self.k_sem = nn.Linear(d, dims["k_sem_width"], bias=b)
                self.k_geo = nn.Linear(d, dims["k_geo_width"], bias=b)
            self.v_proj = nn.Linear(d, dims["v_width"], bias=b)
        else:
            self.q_proj = nn.Linear(d, dims["qk"], bias=b)
            if not c.tie_qk:
                self.k_proj = nn.Linear(d, dims["k_width"], bias=b)
            self.v_proj = nn.Linear(d, dims["v_width"], bias=b)
        self.out_proj = nn.Linear(dims["v"], d, bias=c.out_bias)
        if c.learned_temp:
            self.logit_scale = nn.Parameter(torch.zeros(h))
        if c.null_attn:
            if c.attn_mode == "decoupled":  # one null key/value per kv head
                self.k_sem_null = nn.Parameter(torch.zeros(1, 1, dims["k_sem_width"]))
                self.k_geo_null = nn.Parameter(torch.zeros(1, 1, dims["k_geo_width"]))
                self.v_null = nn.Parameter(torch.zeros(1, 1, dims["v_width"]))
            else:
                self.k_null = nn.Parameter(torch.zeros(1, 1, dims["k_width"]))
                self.v_null = nn.Parameter(torch.zeros(1, 1, dims["v_width"]))

    def _key(self, name):
        """The K projection; under tie_qk it is the Q projection itself."""
        return getattr(self, ("q" if self.c.tie_qk else "k") + name)

    def _freqs(self, shared, device):
        """(queries' frequencies, keys' frequencies): the model's shared (r/2,) table, or this
        layer's recorded rows (K, r/2), query head i rotating with its kv head i // (H / K)."""
        if self.key_freqs is None:
            return shared, shared
        keys = torch.tensor(self.key_freqs, dtype=torch.float32, device=device)
        return keys.repeat_interleave(self.c.n_head // self.dims["n_kv"], dim=0), keys

    def forward(self, x, positions, inv_freq, mask):
        """x (B, T, d_model) at `positions` (B|1, T) -> (B, T, d_model). inv_freq: the model's
        RoPE frequencies (r/2,) unless this layer records its own. mask: None (causal) or bool
        (B|1, 1, T, keys) where keys counts the null key first when there is one."""
        c, dims = self.c, self.dims
        bsz, t, _ = x.shape
        h, n_kv = c.n_head, dims["n_kv"]

        def heads(y, n):
            return y.view(bsz, t, n, -1).transpose(1, 2)

        temp = self.logit_scale.exp().to(x.dtype)[None, :, None, None] if c.learned_temp else None
        if c.rope:
            freq_q, freq_k = self._freqs(inv_freq, x.device)
        if c.attn_mode == "decoupled":
            ds, dg = c.sem_dim // h, c.geo_dim // h
            s_sem, s_geo = 1.0 / math.sqrt(ds), 1.0 / math.sqrt(dg)
            if c.decoupled_scale == "v29_sdpa":
                s_sem, s_geo = s_sem / math.sqrt(ds + dg), s_geo / math.sqrt(ds + dg)
            q_sem, k_sem = heads(self.q_sem(x), h), heads(self._key("_sem")(x), n_kv)
            q_geo, k_geo = heads(self.q_geo(x), h), heads(self._key("_geo")(x), n_kv)
            if c.rope:
                q_geo, k_geo = rotate(q_geo, positions, freq_q), rotate(k_geo, positions, freq_k)
            if temp is not None:
                q_sem, q_geo = q_sem * temp, q_geo * temp
            # the two paths' scores summed = one dot product over the concatenated per-head slices
            q = torch.cat([q_sem * s_sem, q_geo * s_geo], dim=-1)
            k = torch.cat([k_sem, k_geo], dim=-1)
            v = heads(self.v_proj(x), n_kv)
            if c.null_attn:
                k_null = torch.cat([self.k_sem_null.view(n_kv, ds), self.k_geo_null.view(n_kv, dg)], dim=-1)
                v_null = self.v_null.view(n_kv, -1)
        else:
            q, k, v = heads(self.q_proj(x), h), heads(self._key("_proj")(x), n_kv), heads(self.v_proj(x), n_kv)
            if c.rope:
                q, k = rotate(q, positions, freq_q), rotate(k, positions, freq_k)
            if temp is not None:
                q = q * temp
            q = q * (1.0 / math.sqrt(dims["qk_hd"]))
            if c.null_attn:
                k_null, v_null = self.k_null.view(n_kv, -1), self.v_null.view(n_kv, -1)
        if n_kv != h:  # query head i uses K/V head i // (h / n_kv)
            k, v = k.repeat_interleave(h // n_kv, dim=1), v.repeat_interleave(h // n_kv, dim=1)
            if c.null_attn:
                k_null = k_null.repeat_interleave(h // n_kv, dim=0)
                v_null = v_null.repeat_interleave(h // n_kv, dim=0)
        if c.null_attn:  # one more key in front, the same for every query
            k = torch.cat([k_null.to(k.dtype)[None, :, None, :].expand(bsz, h, 1, -1), k], dim=2)
            v = torch.cat([v_null.to(v.dtype)[None, :, None, :].expand(bsz, h, 1, -1), v], dim=2)
        p = c.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=1.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        y = self.out_proj(y.transpose(1, 2).reshape(bsz, t, -1))
        return F.dropout(y, p=p) if p > 0.0 else y


class DBAMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.kind, self.p, b = c.mlp, c.dropout, c.mlp_bias
        self.w1 = nn.Linear(c.d_model, c.d_ff, bias=b)
        if c.mlp == "swiglu":
            self.w2 = nn.Linear(c.d_model, c.d_ff, bias=b)
            self.w3 = nn.Linear(c.d_ff, c.d_model, bias=b)
        else:
            self.w2 = nn.Linear(c.d_ff, c.d_model, bias=b)

    def forward(self, x):
        if self.kind == "swiglu":
            y = self.w3(F.silu(self.w1(x)) * self.w2(x))
        else:
            y = self.w2(F.gelu(self.w1(x)))  # the exact (erf) GELU
        return F.dropout(y, p=self.p, training=self.training)


class DBABlock(nn.Module):
    def __init__(self, c, layer=0):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.ff = _norm(c), DBAAttention(c, layer), _norm(c), DBAMLP(c)

    def forward(self, x, positions, inv_freq, mask):
        x = x + self.attn(self.ln1(x), positions, inv_freq, mask)
        return x + self.ff(self.ln2(x))


class DBAPreTrainedModel(PreTrainedModel):
    config_class = DBAConfig
    base_model_prefix = "dba"
    main_input_name = "input_ids"
    _no_split_modules = ["DBABlock"]
    supports_gradient_checkpointing = False
    _supports_cache_class = False

    def _init_weights(self, module):
        """dba's initialisation: Linear and Embedding N(0, 0.02), biases 0, norms (1, 0),
        temperature and null parameters 0."""
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, DBARMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, DBAAttention):
                for name in ("logit_scale", "k_null", "v_null", "k_sem_null", "k_geo_null"):
                    if hasattr(module, name):
                        getattr(module, name).zero_()


class DBAForCausalLM(DBAPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.embed_dim)
        if c.embed_dim != c.d_model:
            self.emb_in = nn.Linear(c.embed_dim, c.d_model, bias=False)
            self.emb_out = nn.Linear(c.d_model, c.embed_dim, bias=False)
        self.blocks = nn.ModuleList([DBABlock(c, i) for i in range(c.n_layer)])
        self.ln_f = _norm(c)
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.embed_dim, c.vocab_size, bias=False)
        self.post_init()

    # the embedding and the head, for transformers' generic tools
    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def get_output_embeddings(self):
        return None if self.config.tie_embeddings else self.lm_head  # tied: the head *is* tok_emb

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # no KV cache: generate() must not make one

    def _positions_and_mask(self, bsz, t, attention_mask, position_ids, device):
        """Positions (B|1, T) and the attention mask: None (plainly causal), or bool (B|1, 1, T, keys)."""
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (batch, length), got shape {tuple(attention_mask.shape)}")
        if position_ids is None:
            if padded:  # count the real tokens only (left padding)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(t, device=device)[None]
        mask = None
        if padded or self.config.null_attn:
            mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]
            if padded:
                keep = attention_mask.to(device=device, dtype=torch.bool)
                # padded keys are never attended; each query still sees itself, so a padding
                # query's row is finite (its output is never used)
                mask = (mask & keep[:, None, :]) | torch.eye(t, dtype=torch.bool, device=device)[None]
            if self.config.null_attn:
                mask = torch.cat([torch.ones(mask.shape[0], t, 1, dtype=torch.bool, device=device), mask], dim=-1)
            mask = mask[:, None]
        return position_ids.to(device), mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, logits_to_keep=0, **kwargs):
        """Logits (B, T, V) in fp32 of the whole sequence. There is no cache: none is returned, an
        empty `past_key_values` / `cache` is ignored and a filled one refused. `labels` gives the
        mean next-token cross-entropy (positions labelled -100 ignored)."""
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = kwargs.get("cache", past_key_values)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError("this model keeps no KV cache: pass the whole sequence (a filled cache was given)")
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        if c.embed_dim != c.d_model:
            x = self.emb_in(x)
        bsz, t, _ = x.shape
        positions, mask = self._positions_and_mask(bsz, t, attention_mask, position_ids, x.device)
        inv_freq = rope_inv_freq(c, x.device) if c.rope else None
        hidden = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, positions, inv_freq, mask)
            if hidden is not None:
                hidden.append(x)
        x = self.ln_f(x)
        if hidden is not None:
            hidden[-1] = x
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
        else:  # the positions to keep, as a tensor
            x = x[:, logits_to_keep]
        if c.embed_dim != c.d_model:
            x = self.emb_out(x)
        head = self.tok_emb.weight if c.tie_embeddings else self.lm_head.weight
        logits = torch.matmul(x, head.t()).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(
                logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits,
                                     hidden_states=tuple(hidden) if hidden is not None else None)
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None, **kwargs):
        """The whole sequence at every step (the model keeps no cache)."""
        if inputs_embeds is not None:
            raise ValueError("this model generates from input_ids only (it keeps no cache to start from embeddings)")
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return inputs
