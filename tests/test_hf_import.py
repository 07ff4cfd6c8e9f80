"""`dba convert HF_DIR DST.safetensors` without transformers (dba/hf_config.py, dba/hf_import.py,
dba/safetensors_stream.py): Hugging Face config.json -> ModelConfig, the name map both ways, the
streamed writer, sharded checkpoints, dtypes, the tokenizer travelling with the export, and every
bad input a one-line error with a non-zero exit that writes nothing. Parity with transformers'
own logits is parity_tests/test_hf.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from dba.hf_config import canonical_to_hf, hf_to_canonical, model_config
from dba.hf_import import convert
from dba.param_shapes import param_shapes
from dba.weight_files import read_weights
from tests.support import write_hf_tokenizer

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 53, "hidden_size": 24,
         "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "tie_word_embeddings": False, "rope_theta": 5e5,
         "hidden_act": "silu"}


def _hf_dir(d: Path, config: dict = LLAMA, *, shards: int = 1, dtype=np.float32, tokenizer: bool = True,
            seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """A Hugging Face directory written with safetensors (its names, its layout), no transformers."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    cfg, _, _ = model_config(config, str(d))
    rng = np.random.default_rng(seed)
    tensors = {canonical_to_hf(k): rng.normal(0, 0.1, s).astype(dtype) for k, s in param_shapes(cfg).items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = {n: tensors[n] for n in names[i::shards]}
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(d / fname))
            weight_map.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        write_hf_tokenizer(d / "tokenizer.json")
    return d, tensors


def test_config_maps_every_family():
    cfg, family, notes = model_config(LLAMA, "x")
    assert family == "llama" and notes == []
    assert (cfg.attn_mode, cfg.n_head, cfg.kv_head, cfg.attn_dim, cfg.d_ff, cfg.norm, cfg.rope_base) == \
        ("gqa", 4, 2, 24, 40, "rmsnorm", 5e5)
    assert not (cfg.tie_embeddings or cfg.learned_temp or cfg.null_attn or cfg.qkv_bias)
    q, _, _ = model_config({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True}, "x")
    assert q.qkv_bias and not q.out_bias and q.tie_embeddings
    m, _, notes = model_config({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": 32,
                                "head_dim": 8}, "x")
    assert m.block_size == 32 and m.attn_dim == 32 and "sliding window 32" in notes[0]
    # both spellings of RoPE scaling: transformers 5's rope_parameters and the hub's rope_scaling
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    a, _, _ = model_config({**LLAMA, "rope_scaling": {"rope_type": "llama3", **scaling}}, "x")
    b, _, _ = model_config({**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}, "x")
    assert a == b and a.rope_type == "llama3" and a.rope_factor == 32.0 and a.rope_original_context == 8192


def test_names_round_trip():
    cfg, _, _ = model_config({**LLAMA, "attention_bias": True, "mlp_bias": True}, "x")
    for name in param_shapes(cfg):
        assert hf_to_canonical(canonical_to_hf(name)) == name
    assert canonical_to_hf("blocks.1.attn.out_proj.bias") == "model.layers.1.self_attn.o_proj.bias"
    assert canonical_to_hf("blocks.0.ff.w3.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_to_canonical("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("shards,dtype,out_dtype", [(1, np.float32, None), (3, np.float32, "bf16"), (2, "bf16", None)])
def test_convert_streams_every_tensor_and_the_tokenizer(tmp_path, shards, dtype, out_dtype):
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bf16" else dtype
    src, tensors = _hf_dir(tmp_path / "hf", shards=shards, dtype=dt)
    cfg, info = convert(src, tmp_path / "m.safetensors", dtype=out_dtype)
    got_cfg, state, meta = read_weights(tmp_path / "m.safetensors")
    assert got_cfg == cfg and set(state) == set(param_shapes(cfg))
    want_bf16 = out_dtype == "bf16" or dtype == "bf16"
    assert info["dtypes"] == (["BF16"] if want_bf16 else ["F32"])
    for name, a in state.items():
        src_a = tensors[canonical_to_hf(name)]
        assert np.dtype(a.dtype).name == ("bfloat16" if want_bf16 else "float32"), name
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(src_a.astype(a.dtype), np.float32))
    record = json.loads(meta["metadata"]["tokenizer"])
    assert record["name"] == "hf" and Path(record["path"]) == tmp_path / "m.tokenizer.json"
    assert (tmp_path / "m.tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_tied_head_drops_the_copy(tmp_path):
    src, tensors = _hf_dir(tmp_path / "hf", {**LLAMA, "tie_word_embeddings": True})
    from safetensors.numpy import save_file

    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # what a tied save may carry too
    save_file(tensors, str(src / "model.safetensors"))
    cfg, _ = convert(src, tmp_path / "m.safetensors")
    assert cfg.tie_embeddings and "lm_head.weight" not in read_weights(tmp_path / "m.safetensors")[1]


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main(["convert", *map(str, argv)])
    return code, capsys.readouterr().err


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


BAD = {
    "no-config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "architecture": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel is not supported"),
    "rope": (lambda d: _edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    "activation": (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act 'gelu'"),
    "missing-shard": (lambda d: (d / "model-00002-of-00002.safetensors").unlink(), "shard model-00002-of-00002"),
    "shape": (lambda d: _rewrite(d, "model.layers.1.mlp.up_proj.weight", np.zeros((40, 23), np.float32)),
              "blocks.1.ff.w2.weight' has shape (40, 23), config expects (40, 24)"),
    "dtype": (lambda d: _rewrite(d, "model.norm.weight", np.ones(24, np.int32)), "has dtype I32, expected a float"),
    "extra": (lambda d: _rewrite(d, "model.layers.0.self_attn.q_norm.weight", np.ones(6, np.float32)),
              "unexpected 1 tensor(s) e.g. 'model.layers.0.self_attn.q_norm.weight'"),
    "lying-header": (lambda d: _lie(d / "model-00001-of-00002.safetensors"), "cannot read"),
    "bin-only": (lambda d: [p.unlink() for p in d.glob("model*")] and (d / "pytorch_model.bin").write_bytes(b"x"),
                 "PyTorch .bin weights only"),
}


def _rewrite(d: Path, name: str, value: np.ndarray) -> None:
    """Replace or add one tensor in the shard that holds (or would hold) it."""
    from safetensors.numpy import load_file, save_file

    index = json.loads((d / "model.safetensors.index.json").read_text())
    fname = index["weight_map"].setdefault(name, "model-00001-of-00002.safetensors")
    tensors = load_file(str(d / fname))
    tensors[name] = value
    save_file(tensors, str(d / fname))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _lie(path: Path) -> None:
    """A header whose length field claims more bytes than the file has."""
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    src, _ = _hf_dir(tmp_path / "hf", shards=2)
    spoil, needle = BAD[case]
    spoil(src)
    out = tmp_path / "out"
    out.mkdir()
    code, err = _cli(capsys, src, out / "m.safetensors")
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    assert list(out.iterdir()) == []  # nothing written, not even the tokenizer or a temporary


def test_cli_converts_and_says_what_it_wrote(tmp_path, capsys):
    src, _ = _hf_dir(tmp_path / "hf", {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True})
    code = main(["convert", str(src), str(tmp_path / "q.safetensors")])
    out = capsys.readouterr().out
    assert code == 0 and "qwen2: 2 layers, 4 heads / 2 kv" in out and "tokenizer" in out
    code, err = _cli(capsys, src, tmp_path / "q.safetensors")
    assert code != 0 and "already exists" in err  # never overwritten without --overwrite
    code, err = _cli(capsys, src, tmp_path / "q.pt")
    assert code != 0 and "converts to a .safetensors export" in err


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_converted_model_samples_text(backend, tmp_path, capsys):
    """The tokenizer comes along: `dba sample --prompt TEXT` encodes with it and prints text."""
    src, _ = _hf_dir(tmp_path / "hf")
    convert(src, tmp_path / "m.safetensors")
    code = main(["sample", "--ckpt", str(tmp_path / "m.safetensors"), "--backend", backend, "--prompt", "hello the cat",
                 "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith("hello the cat"), out.out  # the prompt, decoded back to words


@pytest.mark.slow
def test_converted_model_evaluates_and_fine_tunes(tmp_path):
    """`dba eval` scores it and `dba train --ckpt` fine-tunes it (the run's export keeps the config)."""
    from tests.support import dba, ok

    src, _ = _hf_dir(tmp_path / "hf")
    convert(src, tmp_path / "m.safetensors")
    np.save(tmp_path / "ids.npy", (np.arange(4000) * 7 % 53).astype(np.uint16))
    r = ok(dba("eval", "--ckpt", tmp_path / "m.safetensors", "--data", tmp_path / "ids.npy", "--policies", "fp16,q8_0",
               "--contexts", "32", "--windows", "2", "--json", tmp_path / "e.json"))
    recs = json.loads((tmp_path / "e.json").read_text())["records"]
    assert [r["policy"] for r in recs] == ["fp16", "q8_0"] and all(np.isfinite(r["nll"]) for r in recs)
    r = ok(dba("train", "--ckpt", tmp_path / "m.safetensors", "--data", tmp_path / "ids.npy", "--steps", 3,
               "--batch-size", 2, "--train-seq-len", 32, "--eval-every", 0, "--live", "off",
               "--out-dir", tmp_path / "run"))
    cfg, _, _ = read_weights(tmp_path / "run" / "last.safetensors")
    assert cfg.norm == "rmsnorm" and cfg.attn_mode == "gqa" and not cfg.tie_embeddings
