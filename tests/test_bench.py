"""Smoke tests of the benchmark scripts' measurement code on a tiny config (no timings asserted)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from bench import common as bcommon
from bench import decode as bdecode
from bench import memory as bmemory
from bench import profile as bprofile
from bench import train as btrain
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
