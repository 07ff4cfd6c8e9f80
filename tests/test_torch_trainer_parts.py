"""The torch trainer's pieces on their own (no JAX): TorchStepper (torch_train/step.py) and
TorchCheckpoints (torch_train/checkpoints.py).

- a checkpoint round trip continues exactly (bitwise on the CPU, dropout included);
- a kill mid-save and a full disk keep the previous checkpoint; a stale meta.json is noticed;
- `checkpoint_backend` tells torch and Orbax run directories apart;
- a non-finite step (DBA_FAULT nan_grad_at / nan_loss_at) changes nothing and is recorded;
- compiled steps (loss and update) match eager; torch.compile failing falls back to eager with a
  note; grad checkpointing, bf16 parameters
  with autocast and fp16 autocast with loss scaling train.
Parity with the JAX step is parity_tests/test_torch_train_parity.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_ref
from dba.config import ModelConfig
from dba.errors import UserError
from torch_train import checkpoints as torch_checkpoints
from torch_train.checkpoints import TorchCheckpoints, checkpoint_backend
from torch_train.step import TorchStepper
from train.config import OptimConfig, PrecisionConfig

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, d_model=16, d_ff=32, embed_dim=16,
                  attn_mode="decoupled", attn_dim=16, sem_dim=4, geo_dim=8, null_attn=True)
OPTIM = {"lr": 3e-3, "lr_schedule": "cosine", "warmup_steps": 2, "min_lr": 1e-4, "weight_decay": 0.1,
         "grad_clip": 0.5}
TOTAL_STEPS = 12


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _stepper(cfg=CFG, opt="adamw", seed=0, dtype=torch.float32, init_seed=0, compile=False, **precision):
    torch.manual_seed(init_seed)
    model = torch_ref.DBAModel(cfg).to(dtype=dtype)
    return TorchStepper(model, OptimConfig(name=opt, **OPTIM), PrecisionConfig(**precision), total_steps=TOTAL_STEPS,
                        seed=seed, compile=compile)


def _batch(step, accum=2, b=3, t=12):
    rng = np.random.default_rng(step)
    w = rng.integers(0, CFG.vocab_size, (accum, b, t + 1))
    return w[..., :-1], w[..., 1:]


def _train(st, steps):
    return [st.fetch(st.train_step(*_batch(s), s))["loss"] for s in steps]


def _weights(st):
    return {k: v.copy() for k, v in st.canonical_state().items()}


def test_checkpoint_round_trip_continues_exactly(tmp_path):
    cfg = CFG.replace(dropout=0.1)  # dropout masks must continue too
    a = _stepper(cfg, "lion_v29")
    first = _train(a, range(3))
    ck = TorchCheckpoints(tmp_path)
    ck.save("last", 3, a, seed=0, meta={"best_val": 1.5, "note": "x"})
    straight = _train(a, range(3, 6))
    assert ck.latest_step("last") == 3 and ck.latest_step("best") is None
    assert ck.read_meta("last")["best_val"] == 1.5 and ck.read_meta("last")["devices"]["backend"] == "torch"
    b = _stepper(cfg, "lion_v29", init_seed=1)  # other weights, then restored
    step, meta = TorchCheckpoints(tmp_path).restore("last", b)
    assert step == 3 and meta["note"] == "x"
    resumed = _train(b, range(3, 6))
    assert resumed == straight  # bitwise
    assert all(np.array_equal(v, _weights(b)[k]) for k, v in _weights(a).items())
    assert a.fetch(a.update_count) == b.fetch(b.update_count) == 6
    assert first[0] > straight[-1]
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "last").iterdir())
    assert files == ["meta.json", "torch_state.pt"]
    ck.close()


def test_restore_refuses_another_optimizer_or_model(tmp_path):
    a = _stepper()
    TorchCheckpoints(tmp_path).save("last", 1, a, 0, {})
    with pytest.raises(UserError, match="optimizer is 'adamw'"):
        TorchCheckpoints(tmp_path).restore("last", _stepper(opt="lion"))
    with pytest.raises(UserError, match="does not fit this model"):
        TorchCheckpoints(tmp_path).restore("last", _stepper(CFG.replace(d_ff=48)))
    with pytest.raises(UserError, match="no 'best' checkpoint"):
        TorchCheckpoints(tmp_path).restore("best", a)


class _Killed(BaseException):
    """Stands for the SIGKILL of the kill_in_save hook: nothing after it runs, no cleanup."""


def test_kill_and_enospc_mid_save_keep_the_previous_checkpoint(tmp_path, monkeypatch):
    st = _stepper()
    _train(st, range(2))
    ck = TorchCheckpoints(tmp_path)
    ck.save("last", 2, st, 0, {"at": 2})
    kept = (tmp_path / "checkpoints" / "last" / "torch_state.pt").read_bytes()
    _train(st, range(2, 4))

    def killed(where):
        raise _Killed(where)

    monkeypatch.setattr(torch_checkpoints, "_fault_kill", killed)
    monkeypatch.setenv("DBA_FAULT", "kill_in_save:4")
    with pytest.raises(_Killed, match="inside the save of step 4"):
        ck.save("last", 4, st, 0, {"at": 4})
    d = tmp_path / "checkpoints" / "last"
    assert any(".tmp-" in p.name for p in d.iterdir())  # the new files were written, not published
    fresh = TorchCheckpoints(tmp_path)
    assert fresh.latest_step("last") == 2 and fresh.read_meta("last")["at"] == 2
    assert (d / "torch_state.pt").read_bytes() == kept
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "torch_state.pt"]  # leftovers removed

    monkeypatch.setenv("DBA_FAULT", "enospc_in_save:4")
    with pytest.raises(UserError) as e:
        fresh.save("last", 4, st, 0, {"at": 4})
    msg = str(e.value)
    assert "disk is full" in msg and "(step 2) is kept" in msg and "\n" not in msg and e.value.code == 1
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "torch_state.pt"]
    assert fresh.latest_step("last") == 2
    with pytest.raises(UserError, match="there is no earlier 'best' checkpoint"):
        fresh.save("best", 4, st, 0, {})

    monkeypatch.setenv("DBA_FAULT", "kill_after_save:4")
    with pytest.raises(_Killed, match="after the 'last' checkpoint of step 4 was committed"):
        fresh.save("last", 4, st, 0, {"at": 4})
    assert TorchCheckpoints(tmp_path).latest_step("last") == 4


@pytest.mark.slow
def test_kill_in_save_real_sigkill(tmp_path):
    """The real hook in a subprocess (which also shows the torch modules never import JAX)."""
    script = f"""
import sys, torch, torch_ref
from dba.config import ModelConfig
from torch_train.step import TorchStepper
from torch_train.checkpoints import TorchCheckpoints
from train.config import OptimConfig, PrecisionConfig
import torch_ref.analysis
assert not any(m.split('.')[0] in ('jax', 'flax', 'optax', 'orbax') for m in sys.modules), 'JAX imported'
m = torch_ref.DBAModel(ModelConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, d_model=16, d_ff=32,
                                   embed_dim=16, attn_mode="decoupled", attn_dim=16, sem_dim=4, geo_dim=8))
st = TorchStepper(m, OptimConfig(lr=1e-3), PrecisionConfig(), total_steps=10)
ck = TorchCheckpoints({str(tmp_path)!r})
ck.save("last", 1, st, 0, {{}})
print("saved 1", flush=True)
ck.save("last", 2, st, 0, {{}})
print("not reached", flush=True)
"""
    env = {**os.environ, "DBA_FAULT": "kill_in_save:2", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    assert "saved 1" in r.stdout and "DBA_FAULT: SIGKILL inside the save of step 2" in r.stdout
    assert "not reached" not in r.stdout
    assert TorchCheckpoints(tmp_path).latest_step("last") == 1
    assert checkpoint_backend(tmp_path) == "torch"


def test_stale_meta_after_a_crash_between_the_renames(tmp_path):
    st = _stepper()
    ck = TorchCheckpoints(tmp_path)
    ck.save("last", 1, st, 0, {"at": 1})
    d = tmp_path / "checkpoints" / "last"
    old_meta = (d / "meta.json").read_text()
    ck.save("last", 2, st, 0, {"at": 2})
    (d / "meta.json").write_text(old_meta)  # the state file was replaced, the meta not yet
    assert ck.latest_step("last") == 2 and ck.read_meta("last")["at"] == 2
    (d / "meta.json").unlink()
    assert ck.latest_step("last") == 2
    assert json.loads(old_meta)["step"] == 1


def test_checkpoint_backend(tmp_path):
    assert checkpoint_backend(tmp_path) is None
    orbax = tmp_path / "jaxrun" / "checkpoints" / "last"
    (orbax / "7.orbax-checkpoint-tmp").mkdir(parents=True)
    assert checkpoint_backend(tmp_path / "jaxrun") is None  # an unfinished Orbax save is no checkpoint
    (orbax / "12" / "state").mkdir(parents=True)
    assert checkpoint_backend(tmp_path / "jaxrun") == "jax"
    best_only = tmp_path / "b" / "checkpoints" / "best"
    best_only.mkdir(parents=True)
    (best_only / "torch_state.pt").write_bytes(b"")
    assert checkpoint_backend(tmp_path / "b") == "torch"
    (tmp_path / "f" / "checkpoints").mkdir(parents=True)
    (tmp_path / "f" / "checkpoints" / "last").write_text("not a dir")
    assert checkpoint_backend(tmp_path / "f") is None


@pytest.mark.parametrize("fault,kind", [("nan_grad_at", 2), ("nan_loss_at", 1)])
def test_nonfinite_step_applies_no_update(monkeypatch, fault, kind):
    monkeypatch.setenv("DBA_FAULT", f"{fault}:3")
    st = _stepper()
    _train(st, range(2))
    before = {k: v.clone() for k, v in st.state_dict()["optimizer"].items() if torch.is_tensor(v)}
    moments = [t.clone() for p in st.opt.state for t in st.opt.state[p].values()]  # moments and update counts
    weights = _weights(st)
    m = st.fetch(st.train_step(*_batch(2), 2))
    assert m["nonfinite_count"] == 1 and m["lr"] == pytest.approx(st.fetch(before["lr"]))
    assert (np.isnan(m["grad_norm"]) if fault == "nan_grad_at" else np.isnan(m["loss"]))
    assert all(np.array_equal(v, _weights(st)[k]) for k, v in weights.items())
    assert all(torch.equal(a, b) for a, b in zip(moments, [t for p in st.opt.state for t in st.opt.state[p].values()]))
    assert st.fetch(st.update_count) == 2
    assert st.nonfinite_record() == (1, [(3, kind)])
    after = st.fetch(st.train_step(*_batch(3), 3))
    assert np.isfinite(after["loss"]) and after["nonfinite_count"] == 1 and st.fetch(st.update_count) == 3
    st.set_nonfinite_count(5)
    assert st.nonfinite_record() == (5, [(0, 0)] * 5)


def test_host_api():
    st = _stepper()
    assert st.local_rows(6) == slice(0, 6)
    x, y = _batch(0)
    xt = st.put_batch(x.astype(np.int32))
    assert xt.dtype == torch.long and tuple(xt.shape) == x.shape
    assert st.compile_for(xt, xt) == 0.0 and st.compiles == 1 and st.trace_count == 1
    m = st.train_step(xt, st.put_batch(y), 0)
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in m.values())
    assert set(m) == {"loss", "grad_norm", "lr", "nonfinite_count", "grad_norm_embed", "grad_norm_attn",
                      "grad_norm_ffn", "grad_norm_attn_sem", "grad_norm_attn_geo"}
    f = st.fetch(m)
    assert isinstance(f["nonfinite_count"], int) and isinstance(f["loss"], float) and f["lr"] == 0.0
    ev = st.eval_loss(x, y)
    assert ev.dim() == 0 and st.model.training
    assert st.fetch((ev, [ev])) == (ev.item(), [ev.item()])
    st.train_step(*_batch(1, t=8), 1)
    assert st.compiles == 2 and st.memory_bytes == {} and st.memory_limit is None and st.device_memory() is None
    assert st.params is st.model
    cs = st.canonical_state()
    assert "blocks.0.attn.q_sem.weight" in cs and isinstance(cs["tok_emb.weight"], np.ndarray)


@pytest.mark.slow  # traces the loss's forward and backward and the update (~6 s)
def test_compiled_steps_match_eager(monkeypatch):
    """torch.compile of the loss and of the update (norm, clip, AdamW) traces them whole and
    changes the arithmetic's order only: three steps (two micro-batches each, clipping active)
    stay within 1e-5 of eager. Traced through AOTAutograd without Inductor's C++ code generation
    (which takes ~30 s even for this model; `dba bench v29 --parts train` runs it, and checks
    the first step's parameters against v29's)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    st, eager = _stepper(compile=True), _stepper()
    got, want = _train(st, range(3)), _train(eager, range(3))
    assert st.compiling and st.compile_note is None and st.compile_s > 0
    assert all(fn is not e for fn, e in zip(st._update_fns, st._eager_update_fns))  # no fallback happened
    assert np.allclose(got, want, rtol=0, atol=1e-5)
    a, b = _weights(st), _weights(eager)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    assert any(float(np.abs(a[k] - _weights(_stepper())[k]).max()) > 1e-3 for k in a)  # the steps moved them


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler here\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    st = _stepper(compile=True)
    assert st.compiling
    eager = _stepper()
    assert _train(st, range(2)) == _train(eager, range(2))
    assert not st.compiling and "RuntimeError: no C++ compiler here" in st.compile_note
    assert "\n" not in st.compile_note and st.compile_s == 0.0


def test_grad_checkpoint_gives_the_same_steps(monkeypatch):
    """grad_checkpoint recomputes every block in the backward pass (torch.utils.checkpoint runs
    once per block and micro-batch, and not at all without it) and gives the same steps."""
    import torch.utils.checkpoint as tuc

    calls = []
    plain_checkpoint = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or plain_checkpoint(fn, *a, **kw))
    cfg = CFG.replace(dropout=0.1)
    plain, ckpt = _stepper(cfg), _stepper(cfg, grad_checkpoint=True)
    a = _train(plain, range(3))
    assert calls == []
    b = _train(ckpt, range(3))
    assert len(calls) == 3 * 2 * cfg.n_layer  # 3 steps x 2 micro-batches x blocks
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for k, v in _weights(plain).items():
        np.testing.assert_allclose(_weights(ckpt)[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_bf16_params_with_autocast_and_fp16_loss_scaling():
    st = _stepper(dtype=torch.bfloat16, amp=True, amp_dtype="bf16")
    losses = _train(st, range(4))
    assert all(np.isfinite(losses)) and st.model.tok_emb.weight.dtype == torch.bfloat16
    assert all(m.dtype == torch.bfloat16 for p in st.opt.state for m in st.opt.moments(p).values())
    assert np.isfinite(st.fetch(st.eval_loss(*_batch(9))))
    fp16 = _stepper(amp=True, amp_dtype="fp16")
    losses = _train(fp16, range(4))
    assert all(np.isfinite(losses)) and fp16.fetch(fp16.update_count) == 4
    assert fp16.state_dict()["loss_scale"]["scale"].item() == 2.0 ** 16
    assert fp16.nonfinite_record()[0] == 0
    # an overflowing scale: the step is skipped, the scale backs off, nothing is recorded
    fp16._scale = torch.tensor(2.0 ** 60)
    before = _weights(fp16)
    m = fp16.fetch(fp16.train_step(*_batch(4), 4))
    assert not np.isfinite(m["grad_norm"]) and np.isfinite(m["loss"]) and m["nonfinite_count"] == 0
    assert fp16.fetch(fp16.update_count) == 4 and fp16.fetch(fp16._scale) == 2.0 ** 59
    assert all(np.array_equal(v, _weights(fp16)[k]) for k, v in before.items())
