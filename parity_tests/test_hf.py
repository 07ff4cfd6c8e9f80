"""Hugging Face models in dba, checked against transformers itself (SPEC §8): tiny random Llama,
Mistral and Qwen2 models built from configs (no hub), saved with save_pretrained, converted with
`dba convert` (dba/hf_import.py) and loaded in both frameworks:

- logits within 1e-4 of transformers' forward (fp32, 72 tokens, logits of order 1-10), in
  torch_ref and jax_model: llama3 RoPE scaling, tied and untied heads, GQA 4:1 and 3:1, biases,
  an explicit head dim, Mistral's sliding window (capped context);
- greedy generation of 32 tokens equal to transformers' `generate` in both frameworks;
- cached decode with an fp16 cache: both frameworks within the fp16 cache's own effect of
  transformers' logits (2e-3 relative), and within a quarter of that effect of each other (a
  framework that stored fp32 instead would differ by the whole effect).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import jax_model  # noqa: E402
import torch_ref  # noqa: E402
from dba.hf_import import convert  # noqa: E402
from dba.kvspec import KVPolicy  # noqa: E402
from tests.support import random_hf_model, tiered  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

T = 72  # > 64 tokens: a wrong RoPE layout or frequency shows by then

# (family, config kwargs): every option of SPEC §8 at least once
CASES = {
    "llama-gqa4-untied-llama3": ("LlamaForCausalLM", dict(
        vocab_size=131, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256,
        rope_theta=50000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama-gqa3-tied-bias": ("LlamaForCausalLM", dict(
        vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        max_position_embeddings=128)),
    "mistral-gqa3-headdim-window": ("MistralForCausalLM", dict(
        vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=512, sliding_window=96)),
    "qwen2-gqa4-tied": ("Qwen2ForCausalLM", dict(
        vocab_size=113, hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=128,
        rope_theta=1000000.0)),
}


@pytest.fixture(scope="module", params=tiered(list(CASES), 1))
def case(request, tmp_path_factory):
    name = request.param
    family, kwargs = CASES[name]
    hf = random_hf_model(family, kwargs, seed=len(name))
    d = tmp_path_factory.mktemp(name)
    hf.save_pretrained(d / "hf")
    cfg, info = convert(d / "hf", d / "model.safetensors")
    tokens = np.random.default_rng(3).integers(0, kwargs["vocab_size"], (2, T))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.float().numpy()
    return name, hf, cfg, info, d / "model.safetensors", tokens, ref


def test_converted_config_says_what_the_family_is(case):
    name, hf, cfg, info, _, _, _ = case
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert (cfg.attn_mode, cfg.norm, cfg.mlp, cfg.learned_temp, cfg.null_attn) == ("gqa", "rmsnorm", "swiglu", False, False)
    assert (cfg.n_head, cfg.kv_head, cfg.attn_dim // cfg.n_head) == (c.num_attention_heads, c.num_key_value_heads, head_dim)
    assert cfg.tie_embeddings == c.tie_word_embeddings and cfg.norm_eps == c.rms_norm_eps
    assert cfg.qkv_bias == (name.startswith("qwen2") or "bias" in name) and cfg.out_bias == ("bias" in name)
    assert cfg.rope_type == ("llama3" if "llama3" in name else "default")
    if "window" in name:
        assert cfg.block_size == 96 and "sliding window 96" in info["notes"][0]


def test_logits_equal_transformers_in_both_frameworks(case):
    name, _, _, _, path, tokens, ref = case
    assert 1.0 < np.abs(ref).max() < 50  # logits of a size that shows an error
    tm = torch_ref.load(path, device="cpu")
    with torch.no_grad():
        got_t = tm(tokens).numpy()
    got_j = np.asarray(jax_model.load(path)(tokens))
    print(f"\n{name}: max |logits - transformers| torch {np.abs(got_t - ref).max():.2e}, "
          f"jax {np.abs(got_j - ref).max():.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert np.abs(got_t - ref).max() <= 1e-4
    assert np.abs(got_j - ref).max() <= 1e-4


def test_greedy_generation_equals_transformers(case):
    name, hf, _, _, path, tokens, _ = case
    prompt = tokens[:, :16]
    with torch.no_grad():
        ids = torch.as_tensor(prompt)  # every prompt token is real: an explicit all-ones mask
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0).numpy()
    tm = torch_ref.load(path, device="cpu")
    got_t = torch_ref.generate(tm, torch.as_tensor(prompt), max_new_tokens=32, temperature=0.0,
                               policy=KVPolicy(kind="fp32")).numpy()
    got_j = np.asarray(jax_model.generate(jax_model.load(path), prompt, max_new_tokens=32, temperature=0.0,
                                          policy=KVPolicy(kind="fp32")))
    assert want.shape == (2, 48)
    np.testing.assert_array_equal(got_t, want)
    np.testing.assert_array_equal(got_j, want)


def test_fp16_cache_decode(case):
    """Prefill 24 tokens, then one at a time through an fp16 cache (SPEC §5's order): each
    framework's logits move from transformers' by the fp16 storage's effect (fp16 keeps ~3
    digits: <= 2e-3 of the largest logit), and the two frameworks differ by much less than it
    (their K/V differ by ~1e-7 before rounding, which now and then rounds to the other fp16 value)."""
    name, _, _, _, path, tokens, ref = case
    policy = KVPolicy(kind="fp16")
    dt = torch_ref.decode_logits(torch_ref.load(path, device="cpu"), tokens, prefill=24, policy=policy).numpy()
    dj = np.asarray(jax_model.decode_logits(jax_model.load(path), tokens, prefill=24, policy=policy))
    effect_t, effect_j, gap = np.abs(dt - ref).max(), np.abs(dj - ref).max(), np.abs(dt - dj).max()
    print(f"\n{name}: fp16 cache decode vs transformers torch {effect_t:.2e} jax {effect_j:.2e}, JAX vs torch {gap:.2e}")
    scale = float(np.abs(ref).max())
    assert 0 < effect_t <= 2e-3 * scale and 0 < effect_j <= 2e-3 * scale
    assert gap <= 0.25 * min(effect_t, effect_j)
