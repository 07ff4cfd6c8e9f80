"""ModelConfig: fields, validation messages, presets, parameter count, JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest

from dba.config import ConfigError, ModelConfig, preset

OK = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=48, d_ff=80, embed_dim=48,
          attn_dim=40, sem_dim=16, geo_dim=24)


def test_v29_defaults():
    c = ModelConfig()
    assert (c.n_layer, c.n_head, c.d_model, c.d_ff, c.embed_dim, c.attn_mode, c.attn_dim) == (6, 8, 512, 2048, 512, "bottleneck", 512)
    assert (c.sem_dim, c.geo_dim, c.rope, c.rope_base, c.tie_qk, c.null_attn, c.learned_temp, c.mlp, c.dropout) == \
        (32, 64, True, 10000.0, False, False, True, "swiglu", 0.0)
    assert c.kv_head is None and c.decoupled_scale == "per_path"


@pytest.mark.parametrize("fields,needle", [
    (dict(d_model=50), "d_model=50 is not divisible by n_head=4"),
    (dict(attn_mode="bottleneck", attn_dim=42), "attn_dim=42 is not divisible by n_head=4"),
    (dict(attn_mode="decoupled", sem_dim=18), "sem_dim=18 is not divisible by n_head=4"),
    (dict(attn_mode="decoupled", geo_dim=22), "geo_dim=22 is not divisible by n_head=4"),
    (dict(attn_mode="decoupled", geo_dim=12), "rope needs an even rotated head dim, got 3"),
    (dict(attn_mode="gqa", kv_head=3), "n_head=4 is not divisible by kv_head=3"),
    (dict(attn_mode="gqa", kv_head=2, tie_qk=True), "tie_qk is not possible with gqa when kv_head=2 != n_head=4"),
    (dict(attn_mode="bottleneck", attn_dim=12), "rope needs an even rotated head dim, got 3"),
    (dict(attn_mode="flash"), "attn_mode must be one of"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(dropout=1.5), "dropout must be in [0, 1)"),
    (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
    (dict(decoupled_scale="sqrt"), "decoupled_scale must be one of"),
    (dict(kv_head=0, attn_mode="gqa"), "kv_head must be a positive integer"),
    # an upcycled student's options
    (dict(attn_mode="decoupled", decoupled_kv_head=3), "n_head=4 is not divisible by decoupled_kv_head=3"),
    (dict(attn_mode="gqa", decoupled_kv_head=2), "decoupled_kv_head=2 needs attn_mode decoupled, got 'gqa'"),
    (dict(attn_mode="decoupled", decoupled_kv_head=2, tie_qk=True), "tie_qk is not possible when decoupled_kv_head=2"),
    (dict(attn_mode="decoupled", decoupled_kv_head=0), "decoupled_kv_head must be a positive integer"),
    (dict(attn_mode="gqa", rope_freqs=((1.0,),)), "rope_freqs (recorded RoPE frequencies) need attn_mode decoupled"),
    (dict(attn_mode="decoupled", geo_dim=16, rope_freqs=(((1.0, 0.1),) * 4,)),
     "rope_freqs must be [n_layer=2][kv heads=4][geo head dim / 2=2] numbers"),
    (dict(attn_mode="decoupled", geo_dim=16, n_layer=1, rope_freqs=(((1.0, -0.1),) * 4,)),
     "rope_freqs must hold positive finite frequencies, got -0.1"),
])
def test_invalid_configs_raise_one_line(fields, needle):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**OK, **fields})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_odd_geo_head_ok_without_rope():
    ModelConfig(**{**OK, "attn_mode": "decoupled", "geo_dim": 12, "rope": False})


def test_json_round_trip():
    c = ModelConfig(**{**OK, "attn_mode": "gqa", "kv_head": 2, "null_attn": True})
    assert ModelConfig.from_json(c.to_json()) == c
    table = tuple(tuple((0.5, float(np.float32(1e-3 * (i + 1)))) for _ in range(2)) for i in range(OK["n_layer"]))
    student = ModelConfig(**{**OK, "attn_mode": "decoupled", "geo_dim": 16, "decoupled_kv_head": 2,
                             "rope_freqs": table})
    back = ModelConfig.from_json(student.to_json())
    assert back == student and back.rope_freqs == table and hash(back) == hash(student)
    assert student.kv_streams() == {"k_sem": 8, "k_geo": 8, "v": 20}  # 2 kv heads of 4 / 4 / 10
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_dict({**c.to_dict(), "n_heads": 3})


def test_v29_payload_selects_sdpa_scaling_only_without_null():
    base = {k: v for k, v in ModelConfig(**{**OK, "attn_mode": "decoupled"}).to_dict().items() if k != "decoupled_scale"}
    assert ModelConfig.from_dict(base, v29=True).decoupled_scale == "v29_sdpa"
    assert ModelConfig.from_dict({**base, "null_attn": True}, v29=True).decoupled_scale == "per_path"
    assert ModelConfig.from_dict(base).decoupled_scale == "per_path"  # new models: the paper's formula


def test_presets_match_v29_dims():
    small = preset("small", attn_mode="decoupled")
    assert (small.d_model, small.n_layer, small.n_head, small.d_ff, small.block_size) == (768, 12, 12, 3072, 1024)
    assert (small.sem_dim, small.geo_dim, small.attn_dim) == (48, 96, 144)
    assert preset("tiny", attn_mode="bottleneck").attn_dim == 96
    assert preset("large", attn_mode="gqa").kv_head == 4
    one_b = preset("1b", attn_mode="decoupled")
    assert (one_b.sem_dim, one_b.geo_dim, one_b.attn_dim, one_b.n_layer) == (256, 512, 768, 18)
    d = preset("medium", exp="paper_decoupled")
    assert d.attn_mode == "decoupled" and d.tie_qk and d.null_attn and d.rope and d.attn_dim == 192
    assert preset(exp="paper_bottleneck").null_attn
    with pytest.raises(ConfigError, match="unknown size preset 'huge'"):
        preset("huge")


def test_param_count_by_hand():
    c = ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, d_model=8, d_ff=12, embed_dim=6,
                    attn_mode="decoupled", attn_dim=4, sem_dim=2, geo_dim=4, tie_qk=True, null_attn=True)
    emb = 10 * 6 + 8 * 6 * 2
    attn = 2 * 8 + 4 * 8 + 4 * 8 + 8 * 4 + 2 + (2 + 4 + 4)  # q_sem, q_geo (k tied), v, out, temp, nulls
    block = attn + 4 * 8 + 3 * 8 * 12
    assert c.num_params() == emb + block + 2 * 8
    seed = ModelConfig(vocab_size=50257, block_size=256, n_layer=12, n_head=12, d_model=768, d_ff=3072,
                       embed_dim=512, attn_mode="decoupled", attn_dim=144, sem_dim=48, geo_dim=96)
    per_block = (48 + 48 + 96 + 96 + 144 + 144) * 768 + 12 + 4 * 768 + 3 * 768 * 3072
    assert seed.num_params() == 50257 * 512 + 2 * 768 * 512 + 12 * per_block + 2 * 768
