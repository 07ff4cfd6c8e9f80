"""`--kv-fused auto` is safe by default (dba/kernel_check.py): a kernel is used for a shape only
after one decode step with it matched the cached attention there; a kernel that raises or returns
wrong logits falls back to the cached attention with one warning, and the verdict is remembered so
later runs skip it. Failures are injected by replacing the frameworks' kernel entry points."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.parity_cases import build_jax, build_torch, make_config, random_state
from dba import kernel_check
from dba.kvspec import KVPolicy
from tests.support import tiered

POLICY = KVPolicy(kind="q4_0", qblock=8, residual=4)


@pytest.fixture(autouse=True)
def fresh_kernel_entries():
    """`cache_attention` memoises the function a mode names: forget those built around a replaced
    kernel, before and after each test (other tests must see the real kernels)."""
    from jax_model import pallas_decode
    from torch_ref import triton_decode

    for module in (pallas_decode, triton_decode):
        module.cache_attention.cache_clear()
    yield
    for module in (pallas_decode, triton_decode):
        module.cache_attention.cache_clear()


def _replace_kernel(monkeypatch, module, fn) -> None:
    monkeypatch.setattr(module, "decode_attend", fn)
    module.cache_attention.cache_clear()


@pytest.fixture(autouse=True)
def checks_file(tmp_path, monkeypatch):
    path = tmp_path / "kernel_checks.json"
    monkeypatch.setenv("DBA_KERNEL_CHECKS", str(path))
    return path


def _counting(result):
    calls = []

    def check():
        calls.append(1)
        return result

    return check, calls


def test_agreeing_kernel_is_used_and_checked_once(checks_file):
    check, calls = _counting(None)
    warnings = []
    for _ in range(2):
        assert kernel_check.checked_kernel("auto", "pallas", "k1", check, warnings.append) == "pallas"
    assert calls == [1] and warnings == []
    assert json.loads(checks_file.read_text()) == {"k1": {"ok": True, "why": None}}


def test_disagreeing_kernel_falls_back_with_one_warning_and_is_skipped_next_time(checks_file):
    check, calls = _counting("it raised RuntimeError: boom")
    first, second = [], []
    assert kernel_check.checked_kernel("auto", "triton", "k2", check, first.append) == "none"
    assert kernel_check.checked_kernel("auto", "triton", "k2", check, second.append) == "none"
    assert calls == [1]  # the second run reads the verdict instead of trying the kernel again
    assert len(first) == 1 and "triton disagrees" in first[0] and "boom" in first[0]
    assert len(second) == 1 and "failed its check for this shape earlier" in second[0] and "boom" in second[0]
    # another shape is checked on its own
    assert kernel_check.checked_kernel("auto", "triton", "k3", _counting(None)[0], first.append) == "triton"


def test_explicit_choices_and_none_are_not_checked():
    check, calls = _counting("wrong")
    assert kernel_check.checked_kernel("pallas", "pallas", "k", check) == "pallas"
    assert kernel_check.checked_kernel("auto", "none", "k", check) == "none"
    assert calls == []


def test_unreadable_verdicts_are_checked_again_and_rewritten(checks_file):
    checks_file.write_text("{not json")
    check, calls = _counting(None)
    assert kernel_check.checked_kernel("auto", "pallas", "k", check, lambda line: None) == "pallas"
    assert calls == [1] and json.loads(checks_file.read_text())["k"]["ok"] is True


def test_disagreement_reasons():
    base = np.array([[1.0, -2.0, 3.0]])

    def boom(mode):
        raise RuntimeError("lowering failed\nsecond line")

    assert kernel_check.disagreement(lambda m: base, "k", np.asarray) is None
    assert kernel_check.disagreement(lambda m: base + (1e-6 if m == "k" else 0), "k", np.asarray) is None
    assert kernel_check.disagreement(boom, "k", np.asarray) == "it raised RuntimeError: lowering failed"
    assert "not finite" in kernel_check.disagreement(lambda m: base * (np.nan if m == "k" else 1), "k", np.asarray)
    why = kernel_check.disagreement(lambda m: base * (1.01 if m == "k" else 1), "k", np.asarray)
    assert why.startswith("max |Δ logits| 1.0e-02")


def test_shape_key_separates_what_compiles_differently():
    cfg = make_config("decoupled", vocab_size=31, block_size=64)
    key = kernel_check.shape_key("jax", "H100", "pallas", cfg, POLICY, 1, 64, 1024)
    assert key != kernel_check.shape_key("jax", "H100", "pallas", cfg, POLICY, 2, 64, 1024)
    assert key != kernel_check.shape_key("jax", "H100", "pallas", cfg, POLICY, 1, 128, 1024)
    assert key != kernel_check.shape_key("jax", "H100", "pallas", cfg, KVPolicy(kind="q8_0"), 1, 64, 1024)
    assert key != kernel_check.shape_key("jax", "H100", "pallas", make_config("gqa", vocab_size=31, block_size=64),
                                         POLICY, 1, 64, 1024)


# ---- the frameworks' one decode step, with the kernel replaced ---------------------------------

@pytest.fixture(scope="module")
def cfg_state():
    cfg = make_config("decoupled", vocab_size=31, block_size=64)
    return cfg, random_state(cfg, seed=5)


@pytest.mark.slow  # three decode compiles (~5 s); the torch mirror runs in the fast tier
def test_jax_kernel_disagreement(cfg_state, monkeypatch):
    from jax_model import cached_attention, pallas_decode
    from jax_model.decode import kernel_disagreement

    model = build_jax(*cfg_state)
    plain = cached_attention.cached_attend
    _replace_kernel(monkeypatch, pallas_decode, lambda mode, *a, **k: plain(*a, **k))
    assert kernel_disagreement(model, POLICY, 2, 40, 16, "pallas") is None

    def raising(mode, *a, **k):
        raise NotImplementedError("Mosaic cannot lower this")

    _replace_kernel(monkeypatch, pallas_decode, raising)
    assert kernel_disagreement(model, POLICY, 2, 40, 16, "pallas") == "it raised NotImplementedError: Mosaic cannot lower this"
    _replace_kernel(monkeypatch, pallas_decode, lambda mode, *a, **k: 1.5 * plain(*a, **k))
    assert kernel_disagreement(model, POLICY, 2, 40, 16, "pallas").startswith("max |Δ logits|")


def test_torch_kernel_disagreement(cfg_state, monkeypatch):
    from torch_ref import cached_attention, triton_decode
    from torch_ref.decode import kernel_disagreement

    model = build_torch(*cfg_state)
    plain = cached_attention.cached_attend
    _replace_kernel(monkeypatch, triton_decode, lambda mode, *a, **k: plain(*a, **k))
    assert kernel_disagreement(model, POLICY, 2, 40, 16, "triton") is None

    def raising(mode, *a, **k):
        raise RuntimeError("PTX for sm_90 failed")

    _replace_kernel(monkeypatch, triton_decode, raising)
    assert kernel_disagreement(model, POLICY, 2, 40, 16, "triton") == "it raised RuntimeError: PTX for sm_90 failed"
    _replace_kernel(monkeypatch, triton_decode, lambda mode, *a, **k: plain(*a, **k).flip(-1))
    assert kernel_disagreement(model, POLICY, 2, 40, 16, "triton").startswith("max |Δ logits|")


# ---- dba sample: auto's kernel broken -> the cached attention's tokens, one warning ------------

@pytest.mark.parametrize("backend", tiered(["torch", "jax"], 1))
def test_sample_with_a_broken_auto_kernel_falls_back(backend, cfg_state, tmp_path, monkeypatch, capsys,
                                                     checks_file):
    import cli.sample
    from cli.main import main
    from dba.weights import save_safetensors
    from jax_model import pallas_decode
    from torch_ref import triton_decode

    ckpt = save_safetensors(tmp_path / "m.safetensors", *cfg_state)
    kernel = "pallas" if backend == "jax" else "triton"
    resolve = cli.sample.resolve_kv_fused
    monkeypatch.setattr(cli.sample, "resolve_kv_fused",  # as on a GPU: auto picks the kernel
                        lambda choice, b, device=None: (kernel, kernel) if choice == "auto" else resolve(choice, b, device))

    def broken(mode, *a, **k):
        raise RuntimeError("the kernel does not compile here")

    _replace_kernel(monkeypatch, pallas_decode if backend == "jax" else triton_decode, broken)
    argv = ["sample", "--ckpt", str(ckpt), "--backend", backend, "--device", "cpu", "--prompt-tokens", "1,2,3",
            "--max-new-tokens", "12", "--temperature", "0", "--kv-cache", "q4_0", "--kv-qblock", "8",
            "--kv-residual", "4"]
    outs = []
    for fused in ("none", "auto", "auto"):
        assert main([*argv, "--kv-fused", fused]) == 0
        out, err = capsys.readouterr()
        outs.append((out.strip(), [line for line in err.splitlines() if line.startswith("warning: --kv-fused")]))
    assert outs[1][0] == outs[0][0] == outs[2][0]  # auto decoded with the cached attention
    assert outs[0][1] == [] and len(outs[1][1]) == 1 and "does not compile here" in outs[1][1][0]
    assert len(outs[2][1]) == 1 and "earlier" in outs[2][1][0]  # the next run skipped it, saying so
    assert list(json.loads(checks_file.read_text()).values()) == [
        {"ok": False, "why": "it raised RuntimeError: the kernel does not compile here"}]
