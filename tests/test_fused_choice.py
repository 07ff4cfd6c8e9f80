"""`--kv-fused` resolution (dba/fused.py): which kernel a backend and device get."""

from __future__ import annotations

import pytest

from dba.errors import UserError
from dba.fused import resolve_fused
from tests.support import TRITON_ONLY_ON_LINUX


@pytest.mark.parametrize("choice,backend,on_gpu,want", [
    ("auto", "jax", True, ("pallas", False)),
    ("auto", "jax", False, ("none", False)),
    ("auto", "torch", True, ("triton", False)),
    ("auto", "torch", False, ("none", False)),
    ("none", "torch", True, ("none", False)),
    ("pallas", "jax", False, ("pallas", True)),  # explicit on a CPU: the interpreter
    ("triton2pass", "torch", False, ("triton2pass", True)),
    ("triton1pass", "torch", True, ("triton1pass", False)),
])
def test_resolve(choice, backend, on_gpu, want):
    assert resolve_fused(choice, backend, on_gpu) == want


@pytest.mark.parametrize("choice,backend,needle", [
    ("triton", "jax", "torch backend's kernel"),
    ("pallas", "torch", "jax backend's kernel"),
    ("cuda", "torch", "--kv-fused 'cuda'"),
])
def test_mistakes(choice, backend, needle):
    with pytest.raises(UserError, match=needle):
        resolve_fused(choice, backend, True)


@pytest.mark.slow
@pytest.mark.kernels
# jax + pallas through `dba sample` is the same switch as this; tests/test_pallas_decode.py runs
# decode_logits with the Pallas kernel switched in (kept out of here for the suite's time)
@pytest.mark.parametrize("backend,kernel", [("torch", "triton2pass"), ("torch", "triton1pass"), ("jax", "pallas")])
def test_sample_with_the_kernel_gives_the_same_tokens(backend, kernel, tmp_path):
    """`dba sample --kv-fused KERNEL` (interpreted on this CPU) decodes greedily through a q4_0 cache
    to the same ids as the framework's cached attention, and says which kernel ran."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch = pytest.importorskip("torch")
    if backend == "torch":
        pytest.importorskip("triton", reason=TRITON_ONLY_ON_LINUX)
    from dba.config import ModelConfig
    from torch_ref import DBAModel, save_export

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, block_size=64, d_model=48, n_layer=2, n_head=3, d_ff=96, embed_dim=48,
                      attn_mode="decoupled", sem_dim=12, geo_dim=24, attn_dim=48, null_attn=True)
    ckpt = save_export(tmp_path / "m.safetensors", DBAModel(cfg))
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    out = {}
    for choice in ("none", kernel):
        r = subprocess.run([sys.executable, "-m", "cli", "sample", "--ckpt", str(ckpt), "--backend", backend,
                            "--prompt-tokens", "3 1 4 1 5 9 2 6", "--max-new-tokens", "12", "--temperature", "0",
                            "--kv-cache", "q4_0", "--kv-qblock", "4", "--kv-residual", "4", "--kv-fused", choice],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert f"decode kernel {choice if choice == 'none' else kernel + ' (interpreted)'}" in r.stderr, r.stderr
        assert "falling back" not in r.stderr and "using cached_attend" not in r.stderr, r.stderr
        out[choice] = r.stdout.strip()
    assert out["none"] == out[kernel] and len(out["none"].split(",")) == 20


def test_jax_switch_follows_the_choice():
    """jax_model's `resolve_kv_fused` (what `dba sample/eval --kv-fused` call) on a CPU: an explicit
    pallas is the interpreted kernel, auto means the cached attention, triton is refused."""
    from jax_model.pallas_decode import resolve_kv_fused

    assert resolve_kv_fused("pallas") == ("pallas-interpret", "pallas (interpreted)")
    assert resolve_kv_fused("auto") == ("none", "none")
    with pytest.raises(UserError, match="torch backend's kernel"):
        resolve_kv_fused("triton")


def test_torch_switch_follows_the_choice(monkeypatch):
    """torch_ref's `resolve_kv_fused` for a model on the CPU: an explicit kernel runs interpreted
    (TRITON_INTERPRET=1), auto means the cached attention, pallas is refused."""
    pytest.importorskip("torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason=TRITON_ONLY_ON_LINUX)
    from torch_ref.triton_decode import resolve_kv_fused

    assert resolve_kv_fused("triton2pass", "cpu") == ("triton2pass", "triton2pass (interpreted)")
    assert resolve_kv_fused("auto", "cpu") == ("none", "none")
    with pytest.raises(UserError, match="jax backend's kernel"):
        resolve_kv_fused("pallas", "cpu")
