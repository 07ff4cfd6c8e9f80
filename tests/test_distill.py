"""Distillation in `dba train` (--distill-from): the terms by hand, the JAX and torch steps against
each other through both phases, blockwise training touching attention only, resume across the
phase boundary, and the mistakes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jax_model
import torch_ref
from bench.parity_cases import build_jax, build_torch, random_state, random_tokens
from dba.config import ModelConfig
from dba.upcycle import StudentPlan, upcycle
from tests.support import dba_train, losses, ok, popen_train
from train.batches import train_batch
from train.config import DistillConfig, OptimConfig, PrecisionConfig
from train.optim import build_optimizer
from train.step import Stepper
from torch_train.step import TorchStepper

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEACHER = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, d_model=40, d_ff=72, embed_dim=40,
                      attn_mode="gqa", attn_dim=40, kv_head=2)


def _student():
    t_state = random_state(TEACHER, 2)
    s_cfg, s_state = upcycle(TEACHER, t_state, StudentPlan(sem_dim=8, geo_dim=16, attn_dim=24))
    return t_state, s_cfg, s_state


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_kd_terms_by_hand_in_both_frameworks(temp):
    from train.distill import kd_terms as jax_terms
    from torch_train.distill import kd_terms as torch_terms

    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 2, (2, 5, 11)).astype(np.float32), rng.normal(0, 2, (2, 5, 11)).astype(np.float32)
    y = rng.integers(0, 11, (2, 5))
    lt, ls = _log_softmax(t.astype(np.float64) / temp), _log_softmax(s.astype(np.float64) / temp)
    kl = temp ** 2 * (np.exp(lt) * (lt - ls)).sum(-1).mean()
    ce = -np.take_along_axis(_log_softmax(s.astype(np.float64)), y[..., None], -1).mean()
    for k, c in (jax_terms(s, t, y, temp), torch_terms(torch.tensor(s), torch.tensor(t), torch.tensor(y), temp)):
        assert float(k) == pytest.approx(kl, rel=1e-5) and float(c) == pytest.approx(ce, rel=1e-5)
    assert float(jax_terms(s, s, y, temp)[0]) == pytest.approx(0.0, abs=1e-6)


def _steppers(blockwise: int, loss: str = "kl+ce", steps: int = 6):
    t_state, s_cfg, s_state = _student()
    o = OptimConfig(name="adamw", lr=3e-3, weight_decay=0.1, grad_clip=1.0)
    d = DistillConfig(distill_from="teacher", loss=loss, temp=2.0, alpha=0.7, blockwise=blockwise)
    js = Stepper(build_jax(s_cfg, s_state), build_optimizer(o, steps), seed=0, teacher=build_jax(TEACHER, t_state),
                 distill=d)
    ts = TorchStepper(build_torch(s_cfg, s_state).train(), o, PrecisionConfig(), total_steps=steps, seed=0,
                      teacher=build_torch(TEACHER, t_state), distill=d)
    return js, ts, s_state


def _stream():
    rng = np.random.default_rng(1)
    base = np.arange(8000) * 5 % 97
    return np.where(rng.random(8000) < 0.2, rng.integers(0, 97, 8000), base).astype(np.int32)


@pytest.mark.slow  # ~8 s: both frameworks through both phases
def test_jax_and_torch_distil_alike_through_both_phases():
    """6 steps (2 blockwise, 4 kl+ce) with grad accumulation: the same objective, terms and
    gradient norms at every step in both trainers; the blockwise steps leave everything but
    attention (and ln1) exactly as it was, weight decay included; the main steps move it."""
    js, ts, s0 = _steppers(blockwise=2)
    tokens = _stream()
    rows = []
    for step in range(6):
        x, y = train_batch(tokens, batch_size=3, grad_accum=2, seed=0, seq_len=64, step=step)
        mj = js.fetch(js.train_step(x, y, step))
        mt = ts.fetch(ts.train_step(ts.put_batch(x), ts.put_batch(y), step))
        rows.append((mj, mt))
        if step == 1:
            after = jax_model.canonical_state(js.model())
            tafter = torch_ref.canonical_state(ts.model)
            for name, a in s0.items():
                moved = np.abs(after[name] - a).max()
                if ".attn." in name or ".ln1." in name:
                    continue
                assert moved == 0.0, name
                assert np.abs(tafter[name] - a).max() == 0.0, name
            assert np.abs(after["blocks.0.attn.q_sem.weight"] - s0["blocks.0.attn.q_sem.weight"]).max() > 1e-4
    for step, (mj, mt) in enumerate(rows):
        keys = ["distill_block_mse"] if step < 2 else ["distill_kl", "distill_ce"]
        assert set(keys) <= set(mj) and set(keys) <= set(mt)
        for k in ["loss", "grad_norm", *keys]:
            assert mj[k] == pytest.approx(mt[k], rel=2e-5, abs=1e-7), (step, k)
    assert rows[0][0]["distill_block_mse"] > 0.01  # the upcycled student starts away from the teacher
    end = jax_model.canonical_state(js.model())
    assert np.abs(end["tok_emb.weight"] - s0["tok_emb.weight"]).max() > 1e-4  # main phase: all of it learns
    assert js.trace_count == 2  # one compile per phase


@pytest.mark.parametrize("blockwise, term", [(1, "distill_block_mse"), (0, "distill_kl")])
def test_a_student_equal_to_its_teacher_has_nothing_to_learn(blockwise, term):
    t_state = random_state(TEACHER, 3)
    d = DistillConfig(distill_from="teacher", loss="kl", blockwise=blockwise)
    js = Stepper(build_jax(TEACHER, t_state), build_optimizer(OptimConfig(name="adamw"), 2), seed=0,
                 teacher=build_jax(TEACHER, t_state), distill=d)
    x, y = train_batch(_stream(), batch_size=2, grad_accum=1, seed=0, seq_len=64, step=0)
    m = js.fetch(js.train_step(x, y, 0))
    # fp32 rounding of two separately compiled forwards of the same weights (a real gap is ~1e-2)
    assert m[term] == pytest.approx(0.0, abs=1e-7) and m["grad_norm"] < 1e-4


# ---- the command ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from dba.weights import save_safetensors

    d = tmp_path_factory.mktemp("distill")
    t_state, s_cfg, s_state = _student()
    save_safetensors(d / "teacher.safetensors", TEACHER, t_state)
    save_safetensors(d / "student.safetensors", s_cfg, s_state)
    return d / "teacher.safetensors", d / "student.safetensors"


def _train(*argv) -> int:
    from cli.main import main

    return main(["train", *map(str, argv)])


@pytest.mark.parametrize("argv, needle, code", [
    (["--distill-temp", "2"], "--distill-temp needs --distill-from TEACHER", 2),
    (["--distill-from", "{t}", "--distill-temp", "0"], "--distill-temp must be positive, got 0.0", 2),
    (["--distill-from", "{t}", "--distill-alpha", "1.5"], "--distill-alpha must be in [0, 1], got 1.5", 2),
    (["--distill-from", "{t}", "--distill-blockwise", "-1"], "--distill-blockwise must be >= 0", 2),
    (["--distill-from", "{missing}"], "checkpoint not found", 1),
])
def test_distill_mistakes_are_one_line(pair, data, tmp_path, capsys, argv, needle, code):
    teacher, student = pair
    argv = [a.format(t=teacher, missing=tmp_path / "nope.safetensors") for a in argv]
    got = _train("--data", data, "--ckpt", student, "--steps", 2, "--out-dir", tmp_path / "run", *argv)
    err = capsys.readouterr().err.strip()
    assert got == code and needle in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_teacher_and_student_must_fit_together(pair, data, tmp_path, capsys):
    from dba.weights import save_safetensors

    teacher, student = pair
    other = tmp_path / "other.safetensors"
    cfg = TEACHER.replace(vocab_size=120)
    save_safetensors(other, cfg, random_state(cfg, 4))
    assert _train("--data", data, "--ckpt", student, "--distill-from", other, "--out-dir", tmp_path / "r") == 2
    assert "the teacher's vocabulary is 120 ids, the student's 97" in capsys.readouterr().err
    shallow = tmp_path / "shallow.safetensors"
    cfg = TEACHER.replace(n_layer=1)
    save_safetensors(shallow, cfg, random_state(cfg, 4))
    assert _train("--data", data, "--ckpt", student, "--distill-from", shallow, "--distill-blockwise", 2,
                  "--out-dir", tmp_path / "r") == 2
    assert "teacher 1 layers x 40, student 2 x 40" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_resume_across_the_phase_boundary_equals_a_straight_run(pair, data, tmp_path, backend):
    teacher, student = pair
    common = ["--data", data, "--ckpt", student, "--distill-from", teacher, "--distill-blockwise", 3,
              "--distill-loss", "kl+ce", "--batch-size", 4, "--train-seq-len", 32, "--eval-every", 3,
              "--log-every", 1, "--live", "off", "--backend", backend, "--device", "cpu"]
    straight = popen_train(*common, "--steps", 6, "--out-dir", tmp_path / "straight")  # beside the split run
    ok(dba_train(*common, "--steps", 2, "--out-dir", tmp_path / "split"))
    ok(dba_train("--out-dir", tmp_path / "split", "--resume", "--steps", 6, "--live", "off"))
    out = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, out[-3000:]
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    from dba.runlog import read_events

    train = read_events(tmp_path / "straight" / "train.jsonl", "train")
    assert [e["step"] for e in train if "distill_block_mse" in e] == [1, 2, 3]
    assert [e["step"] for e in train if "distill_kl" in e and "distill_ce" in e] == [4, 5, 6]
