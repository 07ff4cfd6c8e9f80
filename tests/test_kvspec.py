"""dba.kvspec (SPEC §5 block rules, §6 accounting) and the `dba kv-mem` CLI.

Expected numbers are worked out by hand from the SPEC formulas (written next to each case), or
by a brute-force reading of the SPEC text, never by calling the code under test twice.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dba import ModelConfig
from dba.errors import UserError
from tests.support import v29_fixture
from dba.kvspec import (KV_KINDS, NF4_LEVELS, KVPolicy, StreamSpec, baseline_bytes, human_bytes,
                        kv_bytes, quant_layout, stream_bytes, stream_spec)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = v29_fixture("dec_plain")

SEED = ModelConfig(vocab_size=50257, block_size=256, n_layer=12, n_head=12, d_model=768, d_ff=3072,
                   embed_dim=512, attn_mode="decoupled", sem_dim=48, geo_dim=96, attn_dim=144)
SEED_FLAGS = ["--d-model", "768", "--layers", "12", "--n-head", "12", "--attn-mode", "decoupled",
              "--sem-dim", "48", "--geo-dim", "96", "--attn-dim", "144", "--embed-dim", "512",
              "--vocab-size", "50257", "--block", "256"]


def tiny(mode: str, **kw) -> ModelConfig:
    base = dict(vocab_size=97, block_size=64, n_layer=2, n_head=3, d_model=48, d_ff=80, embed_dim=40,
                attn_mode=mode, attn_dim=42, sem_dim=18, geo_dim=24, kv_head=1 if mode == "gqa" else None)
    base.update(kw)
    return ModelConfig(**base)


# ---- block layout -------------------------------------------------------------------------

@pytest.mark.parametrize("kind,dim,qblock,want", [
    ("q8_0", 48, 32, (32, 64, 2)),     # ceil(48/32)=2 blocks of 32
    ("q8_0", 96, 32, (32, 96, 3)),
    ("q8_0", 100, 0, (32, 128, 4)),    # qblock 0 = default 32
    ("q8_0", 5, 0, (5, 5, 1)),         # dim below the block: one block of dim
    ("q8_0", 31, 7, (7, 35, 5)),       # odd block kept for 8-bit
    ("q8_0", 1, 32, (1, 1, 1)),
    ("q4_0", 144, 32, (32, 160, 5)),
    ("q4_0", 7, 32, (6, 12, 2)),       # odd dim: largest even <= 7 is 6
    ("q4_0", 31, 31, (30, 60, 2)),
    ("nf4", 33, 0, (32, 64, 2)),
    ("nf4", 5, 3, (2, 6, 3)),          # odd qblock lowered to even
    ("nf4", 31, 7, (6, 36, 6)),
    ("q4_0", 1, 32, (2, 2, 1)),        # "at least 2": a 1-wide stream pads to one 2-block
    ("q4_0", 3, 1, (2, 4, 2)),
])
def test_quant_layout_cases(kind, dim, qblock, want):
    assert quant_layout(kind, dim, qblock) == want


def _layout_by_reading(kind: str, dim: int, qblock: int) -> tuple[int, int, int]:
    """Brute-force reading of SPEC §5 "Effective block"."""
    qb = min(qblock if qblock > 0 else 32, dim)
    if kind in ("q4_0", "nf4"):
        evens = [e for e in range(2, qb + 1) if e % 2 == 0]
        qb = max(evens) if evens else 2
    n = 1
    while n * qb < dim:
        n += 1
    pad = n * qb
    if kind in ("q4_0", "nf4") and pad % 2 == 1:
        pad += qb
    return qb, pad, pad // qb


def test_quant_layout_exhaustive_small():
    for kind in ("q8_0", "q4_0", "nf4"):
        for dim in range(1, 70):
            for qblock in range(0, 70):
                qb, pad, nb = quant_layout(kind, dim, qblock)
                assert (qb, pad, nb) == _layout_by_reading(kind, dim, qblock), (kind, dim, qblock)
                assert pad >= dim and pad - dim < qb and nb * qb == pad
                if kind != "q8_0":
                    assert qb % 2 == 0 and pad % 2 == 0


@pytest.mark.parametrize("bad", [dict(kind="q5", dim=8, qblock=8), dict(kind="q8_0", dim=0, qblock=8),
                                 dict(kind="q8_0", dim=8, qblock=-1)])
def test_quant_layout_rejects(bad):
    with pytest.raises(UserError):
        quant_layout(**bad)


# ---- stream bytes -------------------------------------------------------------------------

def test_stream_spec_residual_window():
    assert stream_spec("v", "q8_0", 48, 32, 128, max_len=100).residual == 100  # clipped to max_len
    assert stream_spec("v", "q8_0", 48, 32, 128, max_len=500).residual == 128
    assert stream_spec("v", "q8_0", 48, 32, 128).residual == 128
    assert stream_spec("v", "fp16", 48, 32, 128, max_len=500).residual == 0   # no ring for plain kinds
    assert stream_spec("v", "fp32", 48, 32, 128).residual == 0


@pytest.mark.parametrize("kind,dim,qblock,res,b,s,want", [
    ("fp16", 48, 32, 128, 2, 100, 2 * 100 * 48 * 2),
    ("fp32", 48, 32, 128, 2, 100, 2 * 100 * 48 * 4),
    # q8_0 48/32: pad 64, 2 blocks; ring min(128,100)=100
    ("q8_0", 48, 32, 128, 2, 100, 2 * 100 * 64 + 2 * 100 * 2 * 2 + 2 * 100 * 48 * 2),
    # q8_0 with s above the window: ring is the window (16 tokens)
    ("q8_0", 48, 32, 16, 3, 100, 3 * 100 * 64 + 3 * 100 * 2 * 2 + 3 * 16 * 48 * 2),
    # q4_0 144/32: pad 160 -> 80 payload bytes, 5 blocks
    ("q4_0", 144, 32, 128, 1, 1000, 1000 * 80 + 1000 * 5 * 2 + 128 * 144 * 2),
    # nf4 37/7: qb 6, pad 42 -> 21 bytes, 7 blocks, no ring
    ("nf4", 37, 7, 0, 2, 10, 2 * 10 * 21 + 2 * 10 * 7 * 2),
])
def test_stream_bytes_hand_formula(kind, dim, qblock, res, b, s, want):
    spec = stream_spec("x", kind, dim, qblock, res, max_len=s)
    assert stream_bytes(spec, b, s) == want


def test_stream_bytes_clips_ring_to_length():
    # a spec built without max_len keeps the requested window; the bytes still count min(res, s)
    spec = stream_spec("x", "q8_0", 48, 32, 128)
    assert stream_bytes(spec, 1, 10) == 10 * 64 + 10 * 2 * 2 + 10 * 48 * 2
    assert stream_bytes(spec, 2, 200) == 2 * 200 * 64 + 2 * 200 * 2 * 2 + 2 * 128 * 48 * 2


def test_kv_bytes_details_and_layers():
    cfg = tiny("decoupled")
    pol = KVPolicy(kind="q4_0", qblock=8, residual=4)
    got = kv_bytes(cfg, 10, batch=2, policy=pol)
    # k_sem 18 q4_0/8: pad 24 -> 12 B + 3 scales; k_geo 24 q8_0 (hetero default)/8: 24 B + 3 scales;
    # v 42 q4_0/8: pad 48 -> 24 B + 6 scales; each ring 4 tokens fp16.
    k_sem = 2 * 10 * 12 + 2 * 10 * 3 * 2 + 2 * 4 * 18 * 2
    k_geo = 2 * 10 * 24 + 2 * 10 * 3 * 2 + 2 * 4 * 24 * 2
    v = 2 * 10 * 24 + 2 * 10 * 6 * 2 + 2 * 4 * 42 * 2
    assert got["per_layer_bytes"] == k_sem + k_geo + v
    assert got["total_bytes"] == 2 * (k_sem + k_geo + v)
    d = got["details"]
    assert d["k_geo"]["kind"] == "q8_0" and d["k_sem"]["kind"] == "q4_0" and d["v"]["kind"] == "q4_0"
    assert (d["v"]["pad_dim"], d["v"]["n_blocks"], d["v"]["residual"], d["v"]["bytes"]) == (48, 6, 4, v)


def test_kv_bytes_modes_fp16():
    # fp16 per token per layer = 2 * (k width + v width)
    assert kv_bytes(tiny("standard"), 7)["total_bytes"] == 2 * 7 * (48 + 48) * 2
    assert kv_bytes(tiny("bottleneck"), 7)["total_bytes"] == 2 * 7 * (42 + 42) * 2
    assert kv_bytes(tiny("gqa"), 7)["total_bytes"] == 2 * 7 * (14 + 14) * 2  # kv_head 1 x hd 14
    assert kv_bytes(tiny("decoupled"), 7)["total_bytes"] == 2 * 7 * (18 + 24 + 42) * 2
    assert baseline_bytes(tiny("gqa"), 7)["total_bytes"] == 2 * 7 * 96 * 2


def test_seed_numbers():
    base = baseline_bytes(SEED, 256)["total_bytes"]
    dec = kv_bytes(SEED, 256)["total_bytes"]
    k128 = kv_bytes(SEED, 128_000)["total_bytes"]
    assert base == 12 * 256 * (768 + 768) * 2 == 9_437_184
    assert dec == 12 * 256 * (48 + 96 + 144) * 2 == 1_769_472
    assert k128 == 12 * 128_000 * 288 * 2
    assert human_bytes(base) == "9.00MB"
    assert human_bytes(dec) == "1.69MB"
    assert f"{base / dec:.2f}" == "5.33"
    assert human_bytes(k128) == "843.8MB"


def test_seed_q4_0_row_of_the_readme():
    """The README's memory table: the seed model with `--kv-cache q4_0` (v29's decoupled default:
    k_sem q4_0, k_geo q8_0, v q4_0, blocks of 32, a 128-token fp16 window), by SPEC §6 by hand."""
    # bytes per token and layer: k_sem 48 ch -> 64 padded: 32 B + 2 fp16 scales; k_geo q8_0 96 ch:
    # 96 B + 3 scales; v 144 ch -> 160 padded: 80 B + 5 scales; the window: 288 fp16 channels
    stored, window = (32 + 4) + (96 + 6) + (80 + 10), 288 * 2

    def want(n):
        return 12 * (n * stored + min(128, n) * window)

    q4 = KVPolicy(kind="q4_0")
    got = {n: kv_bytes(SEED, n, 1, q4)["total_bytes"] for n in (256, 1024, 128_000)}
    assert got == {n: want(n) for n in got}
    assert [human_bytes(got[n]) for n in (256, 1024, 128_000)] == ["1.51MB", "3.52MB", "334.8MB"]
    base = {n: baseline_bytes(SEED, n)["total_bytes"] for n in (1024, 128_000)}
    assert f"{base[1024] / got[1024]:.2f}" == "10.24" and f"{base[128_000] / got[128_000]:.2f}" == "13.44"


@pytest.mark.parametrize("n,want", [
    (0, "0B"), (1, "1B"), (1023, "1023B"), (1024, "1.00KB"), (1536, "1.50KB"),
    (100 * 1024, "100.0KB"), (1024 * 1024 - 1, "1024.0KB"), (102399, "100.00KB"),  # 99.999 -> .2f
    (9_437_184, "9.00MB"), (5 * 1024**4, "5.00TB"), (1024**5, "1024.0TB"), (3 * 1024**3 + 1, "3.00GB"),
])
def test_human_bytes(n, want):
    assert human_bytes(n) == want


# ---- policy -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,needle", [
    (dict(kind="q5"), "q5"), (dict(qblock=-1), "-1"), (dict(residual=-3), "-3"),
    (dict(k_sem="int3"), "int3"), (dict(v="bf16"), "bf16"), (dict(qblock_v=-2), "-2"),
    (dict(qblock=2.5), "2.5"), (dict(residual="x"), "x"),
])
def test_policy_validation(kw, needle):
    with pytest.raises(UserError) as e:
        KVPolicy(**kw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_policy_resolution_and_hetero_default():
    p = KVPolicy(kind="q4_0")
    assert p.resolve("k_sem", "decoupled") == ("q4_0", 32)
    assert p.resolve("k_geo", "decoupled") == ("q8_0", 32)    # v29's heterogeneous default
    assert p.resolve("v", "decoupled") == ("q4_0", 32)
    assert p.resolve("k", "standard") == ("q4_0", 32)         # only decoupled has a geo stream
    assert KVPolicy(kind="q4_0", k_geo="q4_0").resolve("k_geo", "decoupled") == ("q4_0", 32)
    assert KVPolicy(kind="nf4").resolve("k_geo", "decoupled") == ("nf4", 32)
    assert KVPolicy(kind="q8_0").resolve("k_geo", "decoupled") == ("q8_0", 32)
    # per-stream qblock falls back to qblock (None and 0 both mean "not set", like v29's `q or qb`)
    p = KVPolicy(kind="q8_0", qblock=16, qblock_v=8, qblock_k_sem=0, k="nf4", v="fp32")
    assert p.resolve("v", "gqa") == ("fp32", 8)
    assert p.resolve("k", "gqa") == ("nf4", 16)
    assert p.resolve("k_sem", "decoupled") == ("q8_0", 16)   # `k` does not reach decoupled streams
    with pytest.raises(UserError):
        p.resolve("k_sem", "standard")
    with pytest.raises(UserError):
        p.resolve("k", "decoupled")


def test_policy_stream_spec():
    p = KVPolicy(kind="q4_0", qblock=0, residual=200)
    cfg = tiny("decoupled")
    s = p.stream("k_geo", cfg, max_len=64)
    assert s == StreamSpec("k_geo", "q8_0", 24, 24, 24, 1, 64)   # qblock 0 -> 32 -> min with 24
    assert p.stream("v", "bottleneck", dim=42) == StreamSpec("v", "q4_0", 42, 32, 64, 2, 200)
    with pytest.raises(UserError):
        p.stream("v", "bottleneck")  # a mode string needs the width


def test_policy_from_parsed_flags_and_dict():
    ns = argparse.Namespace(kv_cache="q4_0", kv_qblock=None, kv_residual=64, kv_cache_k=None,
                            kv_cache_v="q8_0", kv_cache_k_sem=None, kv_cache_k_geo="nf4",
                            kv_qblock_k=None, kv_qblock_v=16, kv_qblock_k_sem=None, kv_qblock_k_geo=None)
    p = KVPolicy.from_flags(vars(ns))
    assert p == KVPolicy(kind="q4_0", qblock=32, residual=64, v="q8_0", k_geo="nf4", qblock_v=16)
    assert KVPolicy.from_flags(vars(argparse.Namespace())) == KVPolicy()
    assert KVPolicy.from_dict(p.to_dict()) == p
    assert json.loads(json.dumps(p.to_dict()))["k_geo"] == "nf4"
    with pytest.raises(UserError):
        KVPolicy.from_dict({"kind": "fp16", "bogus": 1})


def test_policy_from_flags_reads_a_mapping():
    flags = {"kv_cache": "q8_0", "kv_qblock": 0, "kv_residual": None, "kv_cache_k": "nf4", "kv_qblock_k_sem": 8,
             "kv_cache_k_sem": "q4_0", "unrelated": 3}
    want = KVPolicy(kind="q8_0", qblock=0, k="nf4", k_sem="q4_0", qblock_k_sem=8)
    assert KVPolicy.from_flags(flags) == want
    assert KVPolicy.from_flags(vars(argparse.Namespace(**flags))) == want  # parsed flags
    assert KVPolicy.from_flags({}) == KVPolicy()
    with pytest.raises(UserError, match="q3_k"):
        KVPolicy.from_flags({"kv_cache_v": "q3_k"})


def test_storage_layout_is_what_the_caches_allocate():
    from dba.kvspec import storage_layout

    spec = stream_spec("k_sem", "q4_0", 37, 32, 128, max_len=100)
    assert storage_layout(spec, 2, 100) == {"data": ((2, 100, 32), "uint8"), "scale": ((2, 100, 2), "float16"),
                                            "ring": ((2, 100, 37), "float16")}
    assert storage_layout(stream_spec("v", "q8_0", 24, 8, 0), 1, 5)["ring"] is None
    assert storage_layout(stream_spec("v", "fp32", 24, 8, 64), 1, 5) == {
        "data": ((1, 5, 24), "float32"), "scale": None, "ring": None}


def test_check_room_is_one_line():
    from dba.kvspec import check_room

    check_room(5, 1, 6)
    with pytest.raises(UserError) as e:
        check_room(5, 2, 6)
    assert str(e.value) == "KV cache overflow: 5 cached + 2 new tokens > max_len=6"


def test_constants():
    assert KV_KINDS == ("fp32", "fp16", "q8_0", "q4_0", "nf4")
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[7] == 0.0 and NF4_LEVELS[15] == 1.0
    assert all(a < b for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:]))
    assert NF4_LEVELS[8] == 0.07958029955625534


# ---- dba kv-mem ---------------------------------------------------------------------------

def kvmem(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "kv-mem", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_seed_lines():
    r = kvmem(*SEED_FLAGS)
    assert r.returncode == 0, r.stderr
    for s in ("9.00MB", "1.69MB", "5.33×", "843.8MB", "128,000"):
        assert s in r.stdout, s
    assert "Baseline fp16 (standard attn) @ ctx=256: `9.00MB`" in r.stdout
    assert "This run policy @ 128k: `843.8MB`" in r.stdout


@pytest.mark.slow
def test_cli_json_and_policy():
    r = kvmem(*SEED_FLAGS, "--json", "--kv-cache", "q4_0", "--ctx", "1024,2k", "--batch", "2")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [c["ctx"] for c in d["contexts"]] == [256, 1024, 2000, 128_000]
    assert d["streams"]["k_geo"]["kind"] == "q8_0"
    # q4_0 policy per layer per token: k_sem 48 -> 32 B + 2 scales (36); k_geo q8_0 96 -> 96 + 3*2 (102);
    # v 144 -> pad 160 -> 80 + 5*2 (90); rings of 128 tokens (batch 2).
    c = d["contexts"][1]
    per_layer = 2 * 1024 * (36 + 102 + 90) + 2 * 128 * (48 + 96 + 144) * 2
    assert c["policy_bytes"] == 12 * per_layer
    assert c["baseline_bytes"] == 12 * 2 * 1024 * 1536 * 2
    assert c["attn_fp16_bytes"] == 12 * 2 * 1024 * 288 * 2
    r_ = c["ratios"]
    assert math.isclose(r_["architecture"] * r_["quantization"], r_["end_to_end"], rel_tol=1e-12)
    assert math.isclose(r_["end_to_end"], c["baseline_bytes"] / c["policy_bytes"])


@pytest.mark.slow
def test_cli_presets():
    r = kvmem("--size", "small", "--exp", "paper_decoupled", "--json")
    d = json.loads(r.stdout)
    assert (d["config"]["sem_dim"], d["config"]["geo_dim"], d["config"]["attn_dim"]) == (48, 96, 144)
    assert d["contexts"][0]["ctx"] == 1024


@pytest.mark.slow
@pytest.mark.parametrize("argv,needle", [
    (["--kv-cache", "q5"], "q5"),
    (["--batch", "0"], "--batch"),
    (["--ctx", "12x"], "12x"),
    (["--kv-qblock", "-4"], "-4"),
    (["--d-model", "100", "--n-head", "3"], "d_model"),
    (["--ckpt", "/nonexistent/dir"], "not found"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_cli_bad_values(argv, needle):
    r = kvmem(*argv)
    assert r.returncode in (1, 2), r
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert r.stdout == ""


@pytest.mark.slow
def test_cli_ckpt_v29_pt():
    r = kvmem("--ckpt", str(FIXTURE), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    # the fixture: decoupled sem 16 / geo 32 / attn 48, 2 layers, block 64, d_model 64
    assert d["contexts"][0]["ctx"] == 64
    assert d["contexts"][0]["attn_fp16_bytes"] == 2 * 64 * (16 + 32 + 48) * 2
    assert d["contexts"][0]["baseline_bytes"] == 2 * 64 * (64 + 64) * 2
    assert d["config"]["decoupled_scale"] == "v29_sdpa"  # v29 rule for decoupled without null_attn
    r = kvmem("--ckpt", str(FIXTURE / "best.pt"), "--layers", "3")
    assert r.returncode == 2 and "--layers" in r.stderr


@pytest.mark.slow
def test_cli_ckpt_safetensors(tmp_path):
    from dba.weights import param_shapes, save_safetensors

    cfg = tiny("gqa", block_size=32)
    state = {k: np.zeros(s, np.float32) for k, s in param_shapes(cfg).items()}
    save_safetensors(tmp_path / "best.safetensors", cfg, state)
    r = kvmem("--ckpt", str(tmp_path), "--json", "--block", "48")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["config"]["kv_head"] == 1 and d["contexts"][0]["ctx"] == 48
    assert d["contexts"][0]["attn_fp16_bytes"] == 2 * 48 * (14 + 14) * 2


@pytest.mark.slow
def test_dba_core_imports_no_framework():
    code = ("import sys, dba, dba.kvspec, cli.kvmem; dba.kv_bytes; "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules, "
            "[m for m in ('jax', 'torch') if m in sys.modules]")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_grouped_decoupled_keys_shrink_the_cache_by_the_group():
    """decoupled_kv_head=K caches K heads of every stream: H/K times fewer bytes at every policy,
    and the baseline (standard, fp16) is the same model's, without the student's options."""
    cfg = ModelConfig(vocab_size=97, block_size=64, n_layer=3, n_head=6, d_model=60, d_ff=80, embed_dim=60,
                      attn_mode="decoupled", sem_dim=12, geo_dim=24, attn_dim=36)
    grouped = cfg.replace(decoupled_kv_head=2)
    assert grouped.kv_streams() == {"k_sem": 4, "k_geo": 8, "v": 12}
    for policy in (KVPolicy(kind="fp16"), KVPolicy(kind="fp32")):
        assert kv_bytes(cfg, 100, 2, policy)["total_bytes"] == 3 * kv_bytes(grouped, 100, 2, policy)["total_bytes"]
    assert baseline_bytes(grouped, 100) == baseline_bytes(cfg, 100)
