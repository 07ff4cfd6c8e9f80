"""Smoke tests of the benchmark scripts' measurement code on a tiny config (no timings asserted)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from bench import common as bcommon
from bench import decode as bdecode
from bench import memory as bmemory
from bench import profile as bprofile
from bench import train as btrain
from bench import v29 as bv29
from dba.config import ModelConfig
from dba.errors import UserError
from dba.kvspec import KVPolicy, kv_bytes

TINY = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, d_model=16, d_ff=32, embed_dim=16,
                   attn_mode="decoupled", sem_dim=4, geo_dim=8, attn_dim=8, null_attn=True)


def _args(module, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    args = p.parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q4_0", "fp16"])
def test_memory_decode_jax_accounting(kind):
    policy = KVPolicy(kind=kind, residual=8)
    args = _args(bmemory, new_tokens=3, prefill_chunk=16, decode_block=8)
    r = bmemory.decode_jax(TINY, policy, 20, args)
    assert r["cache_bytes"] == kv_bytes(TINY, 20 + 2 * 3, 1, policy)["total_bytes"]
    assert r["cache_in_place"]  # the token loop updates the donated cache, it does not copy it
    assert r["accounted_bytes"] == r["cache_bytes"] + r["xla_temp_bytes"] + r["xla_extra_output_bytes"]
    assert r["rss_start"] is None or r["rss_start"] > 0


@pytest.mark.slow
def test_memory_decode_torch_accounting():
    policy = KVPolicy(kind="q4_0", residual=8)
    r = bmemory.decode_torch(TINY, policy, 20, _args(bmemory, new_tokens=3, prefill_chunk=16, decode_block=8))
    assert r["cache_bytes"] == kv_bytes(TINY, 26, 1, policy)["total_bytes"]
    assert r["decode_s"] > 0


@pytest.mark.slow
def test_memory_train_fields():
    args = _args(bmemory, batch_size=2, seq_len=8, steps=1)
    for fn in (bmemory.train_jax, bmemory.train_torch):
        r = fn(TINY, args)
        n_params = sum(int(v.size) for v in _tiny_param_sizes())
        assert r["params_bytes"] == 4 * n_params
        assert r["opt_state_bytes"] >= r["params_bytes"]  # Lion keeps one momentum per parameter


def _tiny_param_sizes():
    import jax
    from flax import nnx

    from jax_model import DBAModel

    return jax.tree.leaves(nnx.state(DBAModel(TINY), nnx.Param))


def test_peak_rss_context():
    import mmap

    # A fresh anonymous mapping: malloc could hand back heap pages that earlier tests left resident.
    with bmemory.PeakRSS() as m, mmap.mmap(-1, 8 << 20) as buf:
        for off in range(0, len(buf), mmap.PAGESIZE):
            buf[off] = 1  # touch every page: 8 MB of new RSS
    if m.peak is not None:
        assert m.growth >= 4 << 20


@pytest.mark.slow
@pytest.mark.parametrize("runner", [bdecode.bench_jax, bdecode.bench_torch])
def test_decode_bench_runner(runner):
    args = _args(bdecode, new_tokens=2, prefill_chunk=8, decode_block=8, repeats=2)
    policy = KVPolicy(kind="q8_0", residual=4)
    r = runner(TINY, policy, 16, args)
    assert len(r["prefill_s"]) == len(r["decode_s"]) == 2
    assert r["cache_bytes"] == kv_bytes(TINY, 18, 1, policy)["total_bytes"]


@pytest.mark.slow
def test_memory_bench_end_to_end(tmp_path, monkeypatch):
    """`run` in its own process per case writes the JSON fields the README table reads."""
    monkeypatch.setattr(bmemory, "named_config", lambda name, **kw: TINY.replace(**kw))
    out = tmp_path / "m.json"
    args = _args(bmemory, parts="decode", backends="jax", contexts="24", kinds="q4_0", new_tokens=2,
                 prefill_chunk=16, decode_block=8, json=str(out))
    # The config is built here and pickled to the spawned child, so the patch reaches it.
    assert bmemory.run(args) == 0
    data = json.loads(out.read_text())
    (row,) = data["decode"]
    assert row["kv_bytes"] == kv_bytes(TINY, 24 + 4, 1, KVPolicy(kind="q4_0", residual=128))["total_bytes"]
    assert row["cache_bytes"] == row["kv_bytes"] and row["cache_in_place"]
    for key in ("ratio_accounted", "ratio_measured", "rss_growth", "xla_temp_bytes"):
        assert key in row


@pytest.mark.slow
def test_profile_bench_names_ops(tmp_path, monkeypatch, capsys):
    """`dba bench profile` traces the train step and attributes op time to HLO ops."""
    from bench import profile as bprofile

    monkeypatch.setattr(bprofile, "named_config", lambda name, **kw: TINY.replace(**kw))
    out = tmp_path / "p.json"
    args = _args(bprofile, batch_size=2, seq_len=13, steps=1, warmup=1, top=50, json=str(out),
                 trace_dir=str(tmp_path / "trace"))
    assert bprofile.run(args) == 0
    data = json.loads(out.read_text())
    assert data["where"] == "cpu" and data["op_us_per_step"] and data["cost_flops"] > 0
    table = capsys.readouterr().out
    assert "dot_general" in table  # at least one listed op carries its HLO note


def test_hlo_op_notes_parses_compiled_text():
    from bench.profile import hlo_op_notes

    text = ('  %ynn_fusion.3 = f32[256,8192]{1,0} fusion(%a, %b), kind=kCustom, '
            'metadata={op_name="jit(_train_impl)/transpose(jvp())/dot_general" stack_frame_id=1}\n'
            '  ROOT %t = (f32[2]{0}) tuple(%x)\n')
    assert hlo_op_notes(text) == {"ynn_fusion.3": "f32[256,8192] transpose(jvp())/dot_general"}


@pytest.mark.parametrize("module, flag, value", [
    (bdecode, "--repeats", "0"), (bdecode, "--residual", "-1"), (bmemory, "--steps", "0"),
    (bmemory, "--seq-len", "two"), (bprofile, "--top", "0"), (bprofile, "--steps", "0"),
    (btrain, "--batch-size", "0"), (btrain, "--warmup", "-1"), (btrain, "--device", "tpu")])
def test_bench_flags_reject_bad_values(module, flag, value, capsys):
    p = argparse.ArgumentParser(prog="bench")
    module.add_arguments(p)
    with pytest.raises(SystemExit) as e:
        p.parse_args([flag, value])
    assert e.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_in_fresh_process_returns_and_reports_child_errors():
    assert bcommon.in_fresh_process(max, 3, 7) == 7
    # A SystemExit in the child used to kill the pool's worker and hang the parent.
    with pytest.raises(UserError, match="^no such device$"):
        bcommon.in_fresh_process(sys.exit, "no such device")
    with pytest.raises(RuntimeError, match="invalid literal for int"):
        bcommon.in_fresh_process(int, "x")


def test_bench_attention_choices_match_the_model():
    from jax_model.attention_kernels import ATTENTION_IMPLS

    assert btrain.ATTENTION_CHOICES == ATTENTION_IMPLS


# ---- dba bench v29 (v29's own script is not needed: CI does not have it) ----------------------------

def _v29_args(path, *argv) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bv29.add_arguments(p)
    return p.parse_args(["--v29", str(path), *map(str, argv)])


def _v29_error(path) -> UserError:
    with pytest.raises(UserError) as e:
        bv29.load_v29(path)
    assert e.value.code == 1 and "\n" not in str(e.value)
    return e.value


def test_v29_bad_paths_are_one_line_errors(tmp_path):
    assert "no such file" in str(_v29_error(tmp_path / "missing.py"))
    assert "is not a file" in str(_v29_error(tmp_path))
    (tmp_path / "notes.txt").write_text("v29\n")
    assert "not a Python file" in str(_v29_error(tmp_path / "notes.txt"))
    other = tmp_path / "other.py"
    other.write_text("import dataclasses\n\n@dataclasses.dataclass\nclass ModelConfig:\n    vocab_size: int = 1\n")
    msg = str(_v29_error(other))
    assert "is not v29's script" in msg and "GPT model with generate()" in msg and "Lion optimizer" in msg
    assert "ModelConfig" not in msg.split("has no")[1]  # the dataclass it has is not listed


@pytest.mark.parametrize("body, shown", [("raise RuntimeError('boom')\n", "RuntimeError: boom"),
                                         ("def broken(:\n", "SyntaxError"),
                                         ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
                                         ("import no_such_module_dba\n", "ModuleNotFoundError")])
def test_v29_failing_import_is_one_line_error(tmp_path, body, shown):
    script = tmp_path / "v29.py"
    script.write_text(body)
    msg = str(_v29_error(script))
    assert "importing it failed" in msg and shown in msg


def test_v29_run_refuses_before_building_anything(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        bv29.run(_v29_args(tmp_path / "missing.py"))
    with pytest.raises(UserError, match="--parts 'train,decode': choose from train, generate"):
        bv29.run(_v29_args(tmp_path / "missing.py", "--parts", "train,decode"))


@pytest.mark.slow
def test_v29_cli_bad_paths(tmp_path):
    from tests.support import dba, one_line_error

    err = one_line_error(dba("bench", "v29", "--v29", tmp_path / "missing.py"), prefix="dba bench: error: --v29 ")
    assert "no such file" in err
    other = tmp_path / "other.py"
    other.write_text("x = 1\n")
    assert "is not v29's script" in one_line_error(dba("bench", "v29", "--v29", other))


def test_v29_help_says_what_is_measured(capsys):
    p = argparse.ArgumentParser(prog="dba bench v29")
    bv29.add_arguments(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = capsys.readouterr().out
    for words in ("Training", "Generation", "fresh process", "logits", "q4_0", "tokens/s"):
        assert words in text


def _step(impl, precision, step_s, loss=9.0):
    return {"impl": impl, "precision": precision, "step_s": step_s, "setup_s": 0.5, "first_loss": loss}


def test_v29_train_summary_ratios():
    results = [_step("v29", "fp32", [0.5, 0.4, 0.7]), _step("v29", "amp", [0.25]),
               _step("dba JAX", "fp32", [0.2, 0.3, 0.25]), _step("dba torch", "bf16", [0.5])]
    rows = bv29.train_summary(results, 2048)
    v29_fp32, _, jax_fp32, torch_bf16 = results
    assert v29_fp32["tokens_per_s"] == pytest.approx(2048 / 0.5)  # the median step
    assert v29_fp32["step_ms_best"] == pytest.approx(400.0)
    assert jax_fp32["vs_v29_same_precision"] == pytest.approx(2.0)  # 0.5 s / 0.25 s
    assert jax_fp32["vs_v29_fastest"] == pytest.approx(1.0)  # v29's fastest is amp, 0.25 s
    assert v29_fp32["vs_v29_fastest"] == pytest.approx(0.5)
    assert torch_bf16["vs_v29_same_precision"] is None  # no v29 bf16 row
    assert torch_bf16["vs_v29_fastest"] == pytest.approx(0.5)
    assert rows[2][:7] == ["dba JAX", "fp32", "8,192", "250.0", "200.0", "2.00x", "1.00x"]
    assert rows[3][5] == "n/a"


def test_v29_generate_summary_ratios_and_tokens():
    results = [{"impl": "v29", "prefill_s": [2.0, 2.2, 1.8], "total_s": [2.6, 2.8, 2.4], "warmup_s": 3.0,
                "tokens": [5, 6, 7, 8]},
               {"impl": "dba JAX", "prefill_s": [0.1], "total_s": [0.3], "warmup_s": 9.0, "tokens": [5, 6, 1, 8]}]
    rows = bv29.generate_summary(results, new_tokens=4, prompt_len=2048)
    v29, jax = results
    assert v29["decode_tok_s"] == pytest.approx(4 / 0.6)  # decode = total - prefill, per repeat
    assert v29["tok_s_incl_prefill"] == pytest.approx(4 / 2.6)
    assert jax["prefill_tok_s"] == pytest.approx(20480)
    assert jax["vs_v29"]["prefill"] == pytest.approx(20.0)  # v29's 2.0 s over 0.1 s
    assert jax["vs_v29"]["decode"] == pytest.approx(3.0)
    assert jax["vs_v29"]["incl_prefill"] == pytest.approx(2.6 / 0.3)
    assert jax["tokens_vs_v29"] == {"equal": 3, "leading": 2, "of": 4}
    assert v29["tokens_vs_v29"] == {"equal": 4, "leading": 4, "of": 4}
    assert rows[1][5:9] == ["20.00x", "3.00x", "8.67x", "3/4 (first 2)"]


def test_v29_agreement_pieces():
    assert bv29.token_agreement([1, 2, 3], [9, 2, 3]) == {"equal": 2, "leading": 0, "of": 3}
    assert bv29.token_agreement([1, 2], [1]) == {"equal": 1, "leading": 1, "of": 2}
    ref = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    moved = {"w": np.array([[0, 6e-4], [0, 0]], np.float32), "b": np.full(3, 5e-7, np.float32)}
    a = bv29.step_agreement(ref, moved)
    assert (a["within"], a["elements"]) == (6, 7) and a["max_abs"] == pytest.approx(6e-4)
    assert bv29.tolerance(1e-5, np.array([0.5, -0.2])) == 1e-5  # logits below 1: the plain bound
    assert bv29.tolerance(1e-5, np.array([3.0, -4.0])) == pytest.approx(4e-5)


def test_v29_round_robin_calls_and_times():
    calls = []

    def make(name):
        def step(k):
            calls.append((name, k))
            return 10.0 + k

        return step

    out = bv29.round_robin({"a": make("a"), "b": make("b")}, warmup=1, n_steps=2,
                           after_first=lambda n: calls.append((n, "after")))
    assert calls[:4] == [("a", 0), ("a", "after"), ("b", 0), ("b", "after")]
    assert calls[4:] == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]  # reversed every other round
    assert out["a"]["first_loss"] == 10.0 and len(out["a"]["step_s"]) == len(out["b"]["step_s"]) == 2


# A stand-in with v29's API (ModelConfig, GPT with forward(idx, caches=...) and generate, Lion),
# built on torch_ref, so the whole benchmark runs without v29's file.
V29_STAND_IN = '''
import dataclasses

import torch

import torch_ref
from dba.config import ModelConfig as _Dba
from dba.kvspec import KVPolicy
from torch_ref import kvcache, optim

ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(_Dba)
                    if f.name != "decoupled_scale"])


class GPT(torch_ref.DBAModel):
    def __init__(self, cfg):
        super().__init__(_Dba.from_dict(dataclasses.asdict(cfg), v29=True))

    def forward(self, idx, caches=None, pos_offset=0):
        if caches is None:
            return super().forward(idx), None
        return self.forward_cached(idx, caches, fresh=caches.pos == 0, decode_block=self.block)

    @torch.no_grad()
    def generate(self, prompt, *, max_new_tokens, temperature=1.0, top_k=None, kv_cache="fp16", kv_qblock=32,
                 kv_residual=128, kv_decode_block=1024):
        assert top_k == 1
        self.block = kv_decode_block
        policy = KVPolicy(kind=kv_cache, qblock=kv_qblock, residual=kv_residual)
        cache = kvcache.init_cache(self.cfg, policy, prompt.shape[0], prompt.shape[1] + max_new_tokens,
                                   device=prompt.device)
        logits, cache = self(prompt, caches=cache)
        out = prompt
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            logits, cache = self(nxt, caches=cache)
        return out


class Lion(optim.Lion):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay, variant="v29")
'''


@pytest.mark.slow
def test_v29_bench_end_to_end_with_a_stand_in(tmp_path, monkeypatch, capsys):
    """Both parts, torch here and JAX in its fresh process, on a tiny config: the checks pass, every
    row is timed and the JSON carries the README's figures."""
    script = tmp_path / "stand_in_v29.py"
    script.write_text(V29_STAND_IN)
    monkeypatch.setattr(bv29, "named_config", lambda name, **kw: TINY.replace(**kw))
    import torch  # the torch-compile rows traced without Inductor's C++ code generation (~30 s)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    out = tmp_path / "v29.json"
    args = _v29_args(script, "--precisions", "fp32", "--batch-size", 2, "--seq-len", 8, "--steps", 1,
                     "--warmup", 0, "--prompt-len", 12, "--new-tokens", 3, "--repeats", 1, "--decode-block", 8,
                     "--residual", 4, "--json", out)
    assert bv29.run(args) == 0
    data = json.loads(out.read_text())
    for part, null in (("train", False), ("generate", True)):
        c = data["checks"][part]
        assert c["null_attn"] is null and c["decoupled_scale"] == ("per_path" if null else "v29_sdpa")
        assert c["torch_max_abs_diff"] <= c["torch_tol"] and c["jax_max_abs_diff"] <= c["jax_tol"]
    rows = data["train"]["results"]
    impls = ("v29", "dba torch", "dba torch compiled", "dba JAX")
    assert sorted((r["impl"], r["precision"]) for r in rows) == sorted((i, "fp32") for i in impls)
    assert all(r["tokens_per_s"] > 0 and r["vs_v29_fastest"] > 0 for r in rows)
    assert set(data["train"]["after_one_step"]) == {"dba torch", "dba torch compiled", "dba JAX"}
    gen = {r["impl"]: r for r in data["generate"]["results"]}
    assert set(gen) == set(impls)
    for impl in ("dba torch", "dba torch compiled"):  # the same computation
        assert gen[impl]["tokens_vs_v29"] == {"equal": 3, "leading": 3, "of": 3}
    assert gen["dba JAX"]["tokens_vs_v29"]["of"] == 3 and gen["dba JAX"]["decode_tok_s"] > 0
    text = capsys.readouterr().out
    assert "Training step, config A" in text and "Generation, config A" in text and "a fresh process" in text


# ---- dba bench convert: the source it writes converts, and the peak it reads is the child's own ----------

def test_convert_bench_source_converts_and_peak_is_parsed(tmp_path):
    from bench import convert as bconvert
    from dba.hf_import import convert
    from dba.weights import load_safetensors

    tiny = {**bconvert.LLAMA_3_2_1B, "vocab_size": 97, "hidden_size": 24, "intermediate_size": 40,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6}
    size = bconvert.write_source(tmp_path / "hf", tiny, shards=3)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and index["metadata"]["total_size"] == size
    cfg, info = convert(tmp_path / "hf", tmp_path / "x.safetensors")
    assert (cfg.n_layer, cfg.d_model, cfg.rope_type) == (2, 24, "llama3") and info["dtypes"] == ["BF16"]
    assert info["bytes"] == size  # tied embeddings: nothing dropped, nothing added
    _, tensors, _ = load_safetensors(tmp_path / "x.safetensors")
    assert str(tensors["tok_emb.weight"].dtype) == "bfloat16" and tensors["tok_emb.weight"].shape == (97, 24)

    assert bconvert._peak_bytes("converted\nVmHWM 553408\n") == 553408 * 1024
    with pytest.raises(SystemExit, match="did not report its peak RSS"):
        bconvert._peak_bytes("converted\n")


def test_upcycle_plants_copies_and_keeps_the_sidecar(tmp_path):
    """`bench upcycle`'s training stream: each 64-token chunk holds a copied half or a repeated
    random span; nothing else changes, and the sidecar still names the held-out text split."""
    from pathlib import Path

    from bench.upcycle import plant_recall
    from dba import prepared

    rng = np.random.default_rng(3)
    src = tmp_path / "text.npy"
    tokens = rng.integers(0, 50_000, 64 * 40).astype(np.uint16)  # distinct enough that copies are planted ones
    np.save(src, tokens)
    np.save(tmp_path / "text.val.npy", tokens[:100])
    side = {"format": prepared.FORMAT, "version": prepared.VERSION, "tokens": len(tokens), "vocab_size": 50_000,
            "dtype": "uint16", "tokenizer": {"name": "byte", "vocab_size": 50_000},
            "val": {"file": "text.val.npy", "tokens": 100}}
    (tmp_path / "text.json").write_text(json.dumps(side))
    dst = Path(tmp_path / "recall.npy")
    rec = plant_recall(src, dst, 64, seed=1)
    out = np.load(dst)
    assert out.dtype == tokens.dtype and len(out) == len(tokens)
    halves = pairs = 0
    for c in range(40):
        chunk, orig = out[c * 64:(c + 1) * 64], tokens[c * 64:(c + 1) * 64]
        changed = np.nonzero(chunk != orig)[0]
        if np.array_equal(chunk[32:], chunk[:32]):
            halves += 1
            assert np.array_equal(chunk[:32], orig[:32])
        else:  # two equal runs of 8..16 ids (a quarter of the chunk at most), the rest untouched
            pairs += 1
            span = len(changed) // 2
            assert 8 <= span <= 16 and len(changed) == 2 * span
            a, b = changed[0], changed[span]
            assert np.array_equal(chunk[a:a + span], chunk[b:b + span]) and b >= a + span
    assert (halves, pairs) == (rec["repeated_halves"], rec["planted_pairs"]) and halves > 5 and pairs > 5
    side_out = prepared.read_sidecar(str(dst))
    assert side_out["val"] == side["val"] and side_out["recall"]["chunk"] == 64
    assert not list(tmp_path.glob("*.tmp*"))


# ---- dba bench gpu: the verdicts it prints, and its refusal without a GPU ----------------------

def test_gpu_check_judges_the_goals_and_refuses_without_a_gpu(monkeypatch):
    from bench import gpu

    dec = [{"ctx": c, "kind": k, "backend": b, "kernel": kern, "decode_step_over_one_read": x, "decode_tok_s": t}
           for c, k, b, kern, x, t in [(32768, "fp16", "jax", "none", 3.0, 900.0), (32768, "q4_0", "jax", "pallas", 2.5, 1500.0),
                                       (32768, "nf4", "torch", "triton2pass", 4.0, 800.0),
                                       (131072, "fp16", "jax", "pallas", 1.8, 300.0),
                                       (131072, "q4_0", "torch", "triton1pass", 2.6, 700.0),
                                       (131072, "q4_0", "jax", "none", 5.0, 200.0)]]
    results = {"kernels": {"results": [{"backend": "jax", "kernel": "pallas", "kind": "nf4", "agrees": True, "why": None},
                                       {"backend": "torch", "kernel": "triton1pass", "kind": "q8_0", "agrees": False,
                                        "why": "it raised RuntimeError: no ptxas"}]},
               "decode": {"results": dec},
               "train": {"config": {"d_model": 768}, "results": [{"backend": "jax", "tokens_per_s": 4e5, "mfu": 0.46},
                                                                  {"backend": "torch", "tokens_per_s": 1.5e5, "mfu": 0.14}]},
               "resume": {"device": "cuda", "resumed_from": [None, 2], "steps": [1, 2, 3, 4], "ok": True}}
    rows = {(r[0], r[1]): r[2:] for r in gpu.verdicts(results, "gpu")}
    assert rows[("kernels", "2 kernel x kind checks vs the cached attention")] == [
        "1 agree; torch triton1pass q8_0: it raised RuntimeError: no ptxas", "all agree", "no"]
    assert rows[("decode", "fp16 at 131,072: best step over one cache read (jax, pallas)")] == ["1.8x", "<= 2x", "yes"]
    assert rows[("decode", "q4_0 at 131,072: best step over one cache read (torch, triton1pass)")][2] == "no"
    assert rows[("decode", "quantized vs fp16 at 32,768 (best tok/s each)")][2] == "no (nf4)"
    assert rows[("decode", "quantized vs fp16 at 131,072 (best tok/s each)")][2] == "yes"
    assert rows[("train", "768-wide step, jax")] == ["400,000 tok/s, MFU 46.0%", ">= 45%", "yes"]
    assert rows[("train", "768-wide step, torch")][2] == "no"
    assert rows[("resume", "torch trainer on cuda: 2 steps, then --resume to 4")][2] == "yes"

    monkeypatch.setattr(gpu, "_has_gpu", lambda: False)
    args = argparse.Namespace(device="auto", parts="kernels", keep=None, json=None)
    with pytest.raises(UserError, match="no CUDA GPU here .*--device cpu rehearses"):
        gpu.run(args)
    with pytest.raises(UserError, match="--parts 'kernels,fly'"):
        gpu.run(argparse.Namespace(device="cpu", parts="kernels,fly", keep=None, json=None))
