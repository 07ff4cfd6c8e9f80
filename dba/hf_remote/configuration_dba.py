"""The configuration of dba's decoupled bottleneck attention transformer for Hugging Face
transformers (`AutoConfig.from_pretrained(DIR, trust_remote_code=True)`).

Written by `dba convert SRC DIR` beside `modeling_dba.py`; it needs transformers only (not dba).
Every field of dba's `ModelConfig` is an attribute of the same name with dba's default, so the
exported `config.json` says exactly which model the weights belong to. transformers' generic
names (hidden_size, num_hidden_layers, ...) read the dba fields through `attribute_map`.

The model has no key/value cache: `use_cache` is False, and generation recomputes the whole
sequence at every step (dba's own sampler, `dba sample`, is the cached, fast path).
"""

from transformers import PretrainedConfig


class DBAConfig(PretrainedConfig):
    model_type = "dba"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "block_size",
    }

    def __init__(
        self,
        vocab_size=50257,
        block_size=1024,
        n_layer=6,
        n_head=8,
        d_model=512,
        d_ff=2048,
        kv_head=None,
        embed_dim=512,
        attn_mode="bottleneck",
        attn_dim=512,
        sem_dim=32,
        geo_dim=64,
        rope=True,
        rope_base=10000.0,
        tie_qk=False,
        null_attn=False,
        learned_temp=True,
        mlp="swiglu",
        dropout=0.0,
        decoupled_scale="per_path",
        norm="layernorm",
        norm_eps=1e-5,
        qkv_bias=False,
        out_bias=False,
        mlp_bias=False,
        tie_embeddings=True,
        rope_type="default",
        rope_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_context=8192,
        decoupled_kv_head=None,
        rope_freqs=None,
        use_cache=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.d_ff = d_ff
        self.kv_head = kv_head
        self.embed_dim = embed_dim
        self.attn_mode = attn_mode
        self.attn_dim = attn_dim
        self.sem_dim = sem_dim
        self.geo_dim = geo_dim
        self.rope = rope
        self.rope_base = rope_base
        self.tie_qk = tie_qk
        self.null_attn = null_attn
        self.learned_temp = learned_temp
        self.mlp = mlp
        self.dropout = dropout
        self.decoupled_scale = decoupled_scale
        self.norm = norm
        self.norm_eps = norm_eps
        self.qkv_bias = qkv_bias
        self.out_bias = out_bias
        self.mlp_bias = mlp_bias
        self.tie_embeddings = tie_embeddings
        self.rope_type = rope_type
        self.rope_factor = rope_factor
        self.rope_low_freq_factor = rope_low_freq_factor
        self.rope_high_freq_factor = rope_high_freq_factor
        self.rope_original_context = rope_original_context
        # an upcycled student's options: decoupled keys/values shared by groups of query heads, and
        # each layer's recorded RoPE frequencies, [n_layer][kv heads][geo head dim / 2]
        self.decoupled_kv_head = decoupled_kv_head
        self.rope_freqs = rope_freqs
        # the model has no KV cache (see the module docstring)
        self.use_cache = use_cache
        # The tied head is the embedding itself (the model has no separate head module to tie),
        # so transformers' own tying has nothing to do either way; the flag only says which it is.
        kwargs["tie_word_embeddings"] = tie_embeddings
        super().__init__(**kwargs)
        if attn_mode not in ("standard", "bottleneck", "decoupled", "gqa"):
            raise ValueError(f"attn_mode must be standard|bottleneck|decoupled|gqa, got {attn_mode!r}")
        if mlp not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be swiglu|gelu, got {mlp!r}")
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be layernorm|rmsnorm, got {norm!r}")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type must be default|llama3, got {rope_type!r}")
        if decoupled_scale not in ("per_path", "v29_sdpa"):
            raise ValueError(f"decoupled_scale must be per_path|v29_sdpa, got {decoupled_scale!r}")
