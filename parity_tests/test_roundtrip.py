"""Weights move between frameworks and formats without changing a bit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import jax_model
import torch_ref
from dba.weights import load_safetensors, tied_aliases
from bench.parity_cases import build_jax, build_torch, make_config, random_state, random_tokens
from tests.support import v29_fixture

FIXTURE = v29_fixture("dec_plain") / "best.pt"


@pytest.mark.parametrize("mode,options", [("decoupled", ("tie_qk", "null", "embed")), ("gqa", ("null",)),
                                          ("standard", ("gelu",)), ("bottleneck", ("tie_qk",))])
def test_torch_safetensors_jax_safetensors_torch_bit_identical(tmp_path, mode, options):
    cfg = make_config(mode, options)
    tm = build_torch(cfg, random_state(cfg, 3))
    original = torch_ref.canonical_state(tm)
    torch_ref.save_export(tmp_path / "a.safetensors", tm)
    jm = jax_model.load(tmp_path / "a.safetensors")
    jax_model.save_export(tmp_path / "b.safetensors", jm)
    back = torch_ref.load(tmp_path / "b.safetensors", device="cpu")
    final = torch_ref.canonical_state(back)
    assert final.keys() == original.keys()
    for k in original:
        assert original[k].dtype == final[k].dtype
        assert np.array_equal(original[k], final[k]), k
    if cfg.tie_qk:  # one tensor under both names in the torch model
        for k, q in tied_aliases(cfg).items():
            assert dict(back.named_parameters(remove_duplicate=False))[k] is dict(back.named_parameters(remove_duplicate=False))[q]


@pytest.mark.slow
def test_v29_pt_export_v29_pt_loads_strictly(tmp_path):
    cfg = make_config("decoupled", ("tie_qk", "null"))
    state = random_state(cfg, 5)
    torch_ref.save_v29(tmp_path / "orig.pt", cfg, state, step=7)
    run = [sys.executable, "-m", "cli", "convert"]
    r1 = subprocess.run(run + [str(tmp_path / "orig.pt"), str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run(run + [str(tmp_path / "x.safetensors"), str(tmp_path / "back.pt")], capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    payload = torch.load(tmp_path / "back.pt", weights_only=True)
    assert payload["step"] == 7 and "decoupled_scale" not in payload["config"]
    sd = payload["model"]
    assert sd["blocks.0.attn.k_sem.weight"].data_ptr() == sd["blocks.0.attn.q_sem.weight"].data_ptr()
    model = torch_ref.DBAModel(cfg)
    model.load_state_dict(sd, strict=True)  # what v29 does with it
    for k, v in state.items():
        assert np.array_equal(sd[k].numpy(), v)


@pytest.mark.slow
def test_convert_v29_fixture_both_ways(tmp_path):
    run = [sys.executable, "-m", "cli", "convert"]
    assert subprocess.run(run + [str(FIXTURE), str(tmp_path / "f.safetensors")], capture_output=True).returncode == 0
    cfg, state, _ = load_safetensors(tmp_path / "f.safetensors")
    assert cfg.decoupled_scale == "v29_sdpa"
    assert subprocess.run(run + [str(tmp_path / "f.safetensors"), str(tmp_path / "f.pt")], capture_output=True).returncode == 0
    a = torch.load(FIXTURE, weights_only=True)["model"]
    b = torch.load(tmp_path / "f.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_convert_refuses_per_path_decoupled_to_v29(tmp_path):
    cfg = make_config("decoupled")  # per_path scaling, no null attention: v29 can't express it
    torch_ref.save_export(tmp_path / "m.safetensors", build_torch(cfg, random_state(cfg)))
    r = subprocess.run([sys.executable, "-m", "cli", "convert", str(tmp_path / "m.safetensors"),
                        str(tmp_path / "m.pt")], capture_output=True, text=True)
    assert r.returncode != 0 and "decoupled_scale" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv,needle", [
    (["missing.pt", "out.safetensors"], "not found"),
    (["{src}", "out.bin"], "unsupported destination"),
    (["{src}", "{src}"], "already exists"),
])
def test_convert_errors_are_one_line(tmp_path, argv, needle):
    cfg = make_config("standard")
    src = tmp_path / "m.safetensors"
    torch_ref.save_export(src, build_torch(cfg, random_state(cfg)))
    argv = [a.format(src=src) for a in argv]
    r = subprocess.run([sys.executable, "-m", "cli", "convert", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode in (1, 2)
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_logits_survive_the_round_trip(tmp_path):
    cfg = make_config("gqa", ("embed",))
    tm = build_torch(cfg, random_state(cfg, 9))
    torch_ref.save_export(tmp_path / "m.safetensors", tm)
    jm = jax_model.load(tmp_path / "m.safetensors")
    toks = random_tokens(cfg, 2, 11)
    with torch.no_grad():
        assert np.abs(tm(toks).numpy() - np.asarray(jm(toks))).max() <= 2e-5
    _ = build_jax  # same builders the matrix uses
