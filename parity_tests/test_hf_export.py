"""dba's models in transformers (dba/hf_export.py, `dba convert SRC DIR`), checked against
transformers 5 itself:

- custom-code exports (every model transformers' classes lack: decoupled attention with null
  attention, tied Q/K, learned temperature, the embedding bottleneck, v29's SDPA scaling; the
  bottleneck and standard modes with v29's LayerNorm; gqa with GELU; no RoPE; llama3 RoPE with a
  learned temperature; an upcycled student's grouped decoupled keys and recorded RoPE frequencies) load with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`:
  logits within 1e-4 of torch_ref's (fp32, 72 tokens, logits of order 1-10), greedy `generate()`
  of 20 tokens equal to `torch_ref.generate` with an fp32 cache (cache on or off), left padding
  that changes no real row, the loss of `labels`, a v29 .pt's own logits, bf16 weights;
- Llama-compatible models export as transformers' own LlamaForCausalLM / Qwen2ForCausalLM (tied
  and untied heads, llama3 RoPE, attention and MLP biases, head_dim != d_model / n_head), with
  the same logits and greedy generation as dba, and RoPE settings transformers reads back;
- a tiny transformers Llama and Qwen2 converted to dba and back are the same tensors (names,
  values) and the same configuration, and still give transformers' logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import torch_ref  # noqa: E402
from bench.parity_cases import build_torch, make_config, random_state, random_tokens  # noqa: E402
from dba.hf_export import export  # noqa: E402
from dba.hf_import import convert  # noqa: E402
from dba.kvspec import KVPolicy  # noqa: E402
from dba.param_shapes import param_shapes, tied_aliases  # noqa: E402
from dba.weights import save_safetensors  # noqa: E402
from tests.support import random_hf_model, tiered, v29_checkpoint, v29_fixture  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

T = 72  # > 64 tokens
NEW = 20  # greedy tokens generated

# dba models transformers has no class for: each needs the exported modeling code
CUSTOM = {
    "decoupled-null-tieqk-temp-embed": make_config("decoupled", ("tie_qk", "null", "embed"), block_size=128),
    "decoupled-v29sdpa-gelu": make_config("decoupled", ("gelu",), decoupled_scale="v29_sdpa", block_size=128),
    "bottleneck-null-layernorm": make_config("bottleneck", ("null",), block_size=128),
    "standard-layernorm": make_config("standard", (), block_size=128),
    "gqa-gelu": make_config("gqa", ("gelu",), block_size=128),
    "gqa-null-temp-rms-bias-untied-llama3": make_config("gqa", ("null", "rms", "bias", "untied", "llama3"),
                                                        block_size=128),
    "standard-tieqk-bias-rms": make_config("standard", ("rms", "tie_qk", "bias", "notemp"), block_size=128),
    "decoupled-norope-null": make_config("decoupled", ("null", "norope", "notemp"), block_size=128),
    # an upcycled student: keys/values shared by groups of 3 query heads, recorded RoPE frequencies
    "decoupled-grouped-recorded-null-rms-bias-untied": make_config(
        "decoupled", ("grouped", "recorded", "null", "rms", "bias", "untied"), block_size=128),
    "decoupled-grouped-gelu-embed": make_config("decoupled", ("grouped", "gelu", "embed"), block_size=128),
}
# dba models that are a Llama or a Qwen2
NATIVE = {
    "llama-gqa-untied-llama3": ("LlamaForCausalLM", make_config("gqa", ("rms", "notemp", "untied", "llama3"),
                                                                block_size=128)),
    "llama-standard-tied-bias": ("LlamaForCausalLM", make_config("standard", ("rms", "notemp", "bias"), block_size=128)),
    "llama-bottleneck-headdim": ("LlamaForCausalLM", make_config("bottleneck", ("rms", "notemp"), block_size=128)),
    "qwen2-gqa-tied": ("Qwen2ForCausalLM", make_config("gqa", ("rms", "notemp"), qkv_bias=True, attn_dim=60,
                                                       block_size=128)),
}


def _export(d: Path, cfg, seed: int, **kw) -> tuple[dict, dict]:
    state = random_state(cfg, seed)
    save_safetensors(d / "m.safetensors", cfg, state)
    return state, export(d / "m.safetensors", d / "hf", **kw)


def _logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def _greedy_hf(model, prompt, **kw) -> np.ndarray:
    ids = torch.as_tensor(prompt)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0, **kw).numpy()


def _greedy_dba(tm, prompt) -> np.ndarray:
    return torch_ref.generate(tm, torch.as_tensor(prompt), max_new_tokens=NEW, temperature=0.0,
                              policy=KVPolicy(kind="fp32")).numpy()


@pytest.fixture(scope="module", params=tiered(list(CUSTOM), 1))
def custom(request, tmp_path_factory):
    name = request.param
    cfg = CUSTOM[name]
    d = tmp_path_factory.mktemp(name)
    state, info = _export(d, cfg, seed=len(name))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "hf", trust_remote_code=True).eval()
    tokens = random_tokens(cfg, 2, T, seed=3)
    return name, cfg, state, info, d / "hf", hf, build_torch(cfg, state), tokens


def test_custom_export_loads_with_its_own_code(custom):
    name, cfg, state, info, out, hf, tm, tokens = custom
    assert info["kind"] == "custom" and info["why"] and type(hf).__name__ == "DBAForCausalLM"
    assert hf.dtype == torch.float32
    # the model's state dict is dba's canonical names (one copy of a tied Q/K), and so is the file
    want = set(param_shapes(cfg)) - set(tied_aliases(cfg))
    assert set(hf.state_dict()) == want
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == want
        for k in want:
            np.testing.assert_array_equal(f.get_tensor(k), state[k])
    ref = tm(tokens).detach().numpy()
    got = _logits(hf, tokens)
    err = np.abs(got - ref).max()
    print(f"\n{name}: max |transformers - dba| {err:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert 1.0 < np.abs(ref).max() < 50  # logits of a size that shows an error
    assert err <= 1e-4


def test_custom_export_generates_like_dba(custom):
    """Greedy generate() equals dba's cached generation, whether transformers is asked for a cache
    or not (the model keeps none and is handed the whole sequence at every step)."""
    name, cfg, _, _, _, hf, tm, tokens = custom
    prompt = tokens[:, :16]
    want = _greedy_dba(tm, prompt)
    assert want.shape == (2, 16 + NEW)
    np.testing.assert_array_equal(_greedy_hf(hf, prompt), want)
    np.testing.assert_array_equal(_greedy_hf(hf, prompt, use_cache=True), want)


def test_custom_export_labels_give_dba_loss(custom):
    name, cfg, _, _, _, hf, tm, tokens = custom
    ids = torch.as_tensor(tokens)
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss.item()
        want = tm.loss(tokens[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - want) <= 1e-5


def test_left_padding_changes_no_real_row(tmp_path):
    """A batch with a left-padded row: the padded keys are never attended and positions count the
    real tokens, so its real positions equal the row alone (null attention: the null key stays)."""
    cfg = CUSTOM["decoupled-null-tieqk-temp-embed"]
    _export(tmp_path, cfg, seed=5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tokens = random_tokens(cfg, 2, T, seed=4)
    pad = 9
    batch = tokens.copy()
    batch[1, :pad] = 0
    mask = np.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        got = hf(torch.as_tensor(batch), attention_mask=torch.as_tensor(mask)).logits.numpy()
        alone = _logits(hf, tokens[1:, pad:])
        full = _logits(hf, tokens[:1])
    assert np.abs(got[1, pad:] - alone[0]).max() <= 1e-4
    assert np.abs(got[0] - full[0]).max() <= 1e-4
    assert np.isfinite(got).all()


def test_v29_checkpoint_exports_with_v29s_logits(tmp_path):
    """A v29 .pt (decoupled, trained at v29's SDPA temperature) exports with its config and
    reproduces the logits v29 itself computed (shared fixture)."""
    d = v29_fixture()
    info = export(v29_checkpoint(d), tmp_path / "hf")
    assert info["kind"] == "custom" and info["config"].decoupled_scale == "v29_sdpa"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["decoupled_scale"] == "v29_sdpa"
    io = np.load(d / "io.npz")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert np.abs(_logits(hf, io["tokens"]) - io["logits"]).max() <= 1e-4


def test_bf16_export_loads_in_bf16(tmp_path):
    """`--dtype bf16`: bf16 tensors, config dtype bfloat16, transformers loads bf16 weights, and the
    next-token distributions stay within DESIGN.md's bf16 bound (mean KL <= 1e-3) of fp32's."""
    cfg = CUSTOM["decoupled-null-tieqk-temp-embed"]
    state, info = _export(tmp_path, cfg, seed=6, dtype="bf16")
    assert info["dtype"] == "BF16"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert hf.dtype == torch.bfloat16
    tokens = random_tokens(cfg, 2, T, seed=3)
    got = torch.log_softmax(torch.as_tensor(_logits(hf, tokens)), -1)
    ref = torch.log_softmax(build_torch(cfg, state)(tokens).detach(), -1)
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    assert 0 < kl <= 1e-3


@pytest.fixture(scope="module", params=tiered(list(NATIVE), 1))
def native(request, tmp_path_factory):
    name = request.param
    arch, cfg = NATIVE[name]
    d = tmp_path_factory.mktemp(name)
    state, info = _export(d, cfg, seed=len(name))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "hf").eval()  # no custom code
    return name, arch, cfg, info, d / "hf", hf, build_torch(cfg, state), random_tokens(cfg, 2, T, seed=3)


def test_native_export_is_transformers_own_class(native):
    name, arch, cfg, info, out, hf, tm, tokens = native
    assert info["kind"] == "native" and type(hf).__name__ == arch
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no code of ours
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # Qwen2 has no field
    assert (c.num_attention_heads, c.num_key_value_heads, head_dim) == (cfg.n_head, cfg.n_kv_head, cfg.head_dim)
    assert c.tie_word_embeddings == cfg.tie_embeddings and c.rms_norm_eps == cfg.norm_eps
    assert c.max_position_embeddings == cfg.block_size
    want_rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_base}
    if cfg.rope_type == "llama3":
        want_rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                         high_freq_factor=cfg.rope_high_freq_factor,
                         original_max_position_embeddings=cfg.rope_original_context)
    assert c.rope_parameters == want_rope  # what transformers 5 reads back
    ref = tm(tokens).detach().numpy()
    err = np.abs(_logits(hf, tokens) - ref).max()
    print(f"\n{name}: max |transformers {arch} - dba| {err:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert 1.0 < np.abs(ref).max() < 50 and err <= 1e-4


def test_native_export_generates_like_dba(native):
    name, arch, cfg, info, out, hf, tm, tokens = native
    prompt = tokens[:, :16]
    np.testing.assert_array_equal(_greedy_hf(hf, prompt), _greedy_dba(tm, prompt))


def test_rope_settings_are_written_for_old_and_new_readers(tmp_path):
    """config.json carries the hub's spelling (`rope_theta`, `rope_scaling` with `rope_type`, as
    transformers 4.x reads it) and 5.x's `rope_parameters`, which agree."""
    _, cfg = NATIVE["llama-gqa-untied-llama3"]
    _export(tmp_path, cfg, seed=1)
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert c["rope_theta"] == cfg.rope_base
    assert c["rope_scaling"] == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    assert c["rope_parameters"] == {**c["rope_scaling"], "rope_theta": cfg.rope_base}
    # a config.json with the hub's spelling alone reads back the same in transformers 5
    old = {k: v for k, v in c.items() if k != "rope_parameters"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "old").rope_parameters == c["rope_parameters"]


# ---- Hugging Face -> dba -> Hugging Face ----------------------------------------------------------

ROUND_TRIP = {
    "llama-gqa-untied-llama3-bias": ("LlamaForCausalLM", dict(
        vocab_size=131, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=256,
        attention_bias=True, mlp_bias=True,
        rope_theta=50000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2-gqa-tied": ("Qwen2ForCausalLM", dict(
        vocab_size=113, hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=128,
        rope_theta=1000000.0)),
}
# the config fields that say which model the weights are
FIELDS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
          "tie_word_embeddings", "max_position_embeddings", "rope_parameters", "attention_bias", "mlp_bias")


@pytest.mark.parametrize("name", tiered(list(ROUND_TRIP), 1))
def test_hf_to_dba_to_hf_is_the_same_model(name, tmp_path):
    family, kwargs = ROUND_TRIP[name]
    hf = random_hf_model(family, kwargs, seed=len(name))
    hf.save_pretrained(tmp_path / "orig")
    convert(tmp_path / "orig", tmp_path / "m.safetensors")
    info = export(tmp_path / "m.safetensors", tmp_path / "back")
    assert info["kind"] == "native" and info["architecture"] == family
    from safetensors import safe_open

    with safe_open(str(tmp_path / "orig" / "model.safetensors"), "numpy") as a, \
            safe_open(str(tmp_path / "back" / "model.safetensors"), "numpy") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and np.array_equal(x, y), k
    orig, back = (transformers.AutoConfig.from_pretrained(tmp_path / d) for d in ("orig", "back"))
    for f in FIELDS:
        if hasattr(orig, f) or hasattr(back, f):
            assert getattr(orig, f, None) == getattr(back, f, None), f
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = np.random.default_rng(3).integers(0, kwargs["vocab_size"], (2, T))
    ref = _logits(hf, tokens)
    tm = torch_ref.load(tmp_path / "m.safetensors", device="cpu")
    with torch.no_grad():
        dba = tm(tokens).numpy()
    assert np.abs(_logits(reloaded, tokens) - ref).max() == 0.0  # the same weights, the same class
    assert np.abs(dba - ref).max() <= 1e-4
