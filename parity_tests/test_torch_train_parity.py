"""The torch trainer's pieces equal the JAX trainer's, on the same weights and batches:

- `TorchStepper` (torch_train/step.py, the step `dba train --backend torch` runs) vs the JAX
  `Stepper` (train/step.py): 20 fp32 CPU steps with grad_accum 2 (and 1) and a warmup + cosine
  schedule give the same loss, gradient norm (total and per group) and learning rate at every
  step, for adamw, lion (paper) and lion_v29;
- a non-finite step (DBA_FAULT nan_grad_at / nan_loss_at) is skipped and recorded the same way;
- torch_ref/analysis.py's pass equals train/analysis.py's for every attention mode.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import jax_model
import torch_ref
from bench.parity_cases import (
    build_jax,
    build_torch,
    make_config,
    random_state,
    random_tokens,
)
from dba.config import ModelConfig
from torch_ref.analysis import Analyzer as TorchAnalyzer
from torch_ref.analysis import analyse as torch_analyse
from train.analysis import AnalysisSpec
from train.analysis import Analyzer as JaxAnalyzer
from tests.support import tiered
from train.batches import train_batch
from train.config import OptimConfig, PrecisionConfig
from train.optim import build_optimizer
from train.step import Stepper
from torch_train.step import TorchStepper


pytestmark = pytest.mark.usefixtures("torch_one_thread")


CFG = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=3, d_model=48, d_ff=96, embed_dim=48,
                  attn_mode="decoupled", attn_dim=48, sem_dim=12, geo_dim=24)
STEPS, ACCUM, BATCH, SEQ = 20, 2, 4, 16


def _stream(n=6000, seed=0):
    """A learnable token stream (a noisy periodic pattern) so the loss really moves."""
    rng = np.random.default_rng(seed)
    base = np.arange(n) * 7 % 97
    return np.where(rng.random(n) < 0.2, rng.integers(0, 97, n), base).astype(np.int32)


def _pair(cfg, opt, *, steps=STEPS, **kw):
    """(JAX Stepper, TorchStepper) from the same weights with the same optimizer group."""
    torch.manual_seed(0)
    tm = torch_ref.DBAModel(cfg)
    state = torch_ref.canonical_state(tm)
    jm = jax_model.load_canonical(jax_model.DBAModel(cfg), state)
    o = OptimConfig(**{"name": opt, "lr": 3e-3 if opt == "adamw" else 1e-3, "grad_clip": 0.5, "lr_schedule": "cosine",
                       "warmup_steps": 4, "min_lr": 1e-4, "weight_decay": 0.1, **kw})
    js = Stepper(jm, build_optimizer(o, steps), seed=0)
    ts = TorchStepper(tm, o, PrecisionConfig(), total_steps=steps, seed=0)
    return js, ts


def _run(js, ts, steps=STEPS, accum=ACCUM):
    tokens = _stream()
    jm, tmx = [], []
    for step in range(steps):
        x, y = train_batch(tokens, batch_size=BATCH, grad_accum=accum, seed=0, seq_len=SEQ, step=step)
        jm.append(js.fetch(js.train_step(x, y, step)))
        tmx.append(ts.fetch(ts.train_step(ts.put_batch(x), ts.put_batch(y), step)))
    return jm, tmx


def _col(rows, key):
    return np.array([r[key] for r in rows], np.float64)


# lion_v29 runs on a tied-Q/K model with null attention, a lexical bottleneck and no weight decay
# on embeddings and 1-D tensors
# adamw again without accumulation, on the tied/null/bottleneck model with the 1-D exemption
VARIANTS = {"adamw": (CFG, {}, ACCUM), "lion": (CFG, {}, ACCUM),
            "lion_v29": (CFG.replace(tie_qk=True, null_attn=True, embed_dim=36), {"wd_exempt_1d": True}, ACCUM),
            "adamw-accum1": (CFG.replace(tie_qk=True, null_attn=True, embed_dim=36), {"wd_exempt_1d": True}, 1)}


@pytest.mark.parametrize("variant", tiered(list(VARIANTS), 1))
def test_torch_stepper_matches_jax_stepper(variant):
    cfg, extra, accum = VARIANTS[variant]
    opt = variant.split("-")[0]
    js, ts = _pair(cfg, opt, **extra)
    jm, tmx = _run(js, ts, accum=accum)
    assert set(jm[0]) == set(tmx[0])
    jl, tl = _col(jm, "loss"), _col(tmx, "loss")
    gap = float(np.max(np.abs(jl - tl)))
    print(f"\n{opt}: max |loss gap| over {STEPS} steps = {gap:.3g}; "
          f"max grad_norm rel gap = {np.max(np.abs(_col(jm, 'grad_norm') / _col(tmx, 'grad_norm') - 1)):.3g}")
    assert jl[-1] < jl[0] - 0.05  # it trains
    # measured 9.5e-7 (adamw, lion) and 1.4e-6 (lion_v29): fp32 rounding of a loss of ~4.5 over 20
    # steps; a wrong lr, decay, clip or moment update moves a step's loss by 1e-4 or more
    assert gap < 5e-6
    for key in jm[0]:
        if key.startswith("grad_norm"):
            np.testing.assert_allclose(_col(tmx, key), _col(jm, key), rtol=1e-3, err_msg=key)
    np.testing.assert_allclose(_col(tmx, "lr"), _col(jm, "lr"), rtol=1e-6, atol=1e-12)
    assert _col(tmx, "lr")[0] == 0.0 and _col(tmx, "lr")[4] == pytest.approx(ts.lr)  # warmup, then the peak
    assert all(r["nonfinite_count"] == 0 for r in tmx)
    # the weights agree too, under canonical names: all of them for AdamW; for Lion all but a few
    # elements whose near-zero momentum took the other sign once (a full lr step apart)
    jw = jax_model.canonical_state(js.model())
    diff = np.concatenate([np.abs(w - jw[name]).ravel() for name, w in ts.canonical_state().items()])
    print(f"{opt}: weights max |gap| {diff.max():.3g}, elements off by > 1e-5: {(diff > 1e-5).mean():.2%}")
    assert (diff > 1e-5).mean() < (0 if opt == "adamw" else 1e-3) + 1e-12


@pytest.mark.parametrize("mode,options", [("decoupled", ("tie_qk", "null", "embed")), ("gqa", ("null",))])
def test_grad_norm_groups_name_the_same_parameters(mode, options):
    """torch_train/step.param_groups on torch names == train/grad_norms.param_groups on the
    JAX model's paths, parameter for parameter (canonical names link the two)."""
    from train.grad_norms import param_groups as jax_groups
    from train.sharding import path_names
    from torch_train.step import param_groups as torch_groups

    cfg = make_config(mode, options)
    decoupled = mode == "decoupled"
    _, params, _ = nnx.split(nnx.eval_shape(lambda: jax_model.DBAModel(cfg)), nnx.Param, ...)
    rename = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
    want = {}
    for path, _leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = path_names(path)
        want[".".join([*names[:-1], rename.get(names[-1], names[-1])])] = jax_groups(names, decoupled)
    got = {name: torch_groups(name.split("."), decoupled) for name, _p in torch_ref.DBAModel(cfg).named_parameters()}
    assert got == want


def test_nonfinite_steps_skipped_like_jax(monkeypatch):
    monkeypatch.setenv("DBA_FAULT", "nan_grad_at:3,nan_loss_at:5")  # step indices 2 and 4
    js, ts = _pair(CFG, "adamw", steps=6)
    jm, tmx = _run(js, ts, steps=6)
    assert js.nonfinite_record() == ts.nonfinite_record() == (2, [(3, 2), (5, 1)])
    assert [r["nonfinite_count"] for r in tmx] == [r["nonfinite_count"] for r in jm] == [0, 0, 1, 1, 2, 2]
    # the lr logged at a skipped step is the previous one, and the schedule does not advance
    np.testing.assert_allclose(_col(tmx, "lr"), _col(jm, "lr"), rtol=1e-6)
    assert tmx[2]["lr"] == tmx[1]["lr"] and tmx[3]["lr"] == pytest.approx(2 * tmx[1]["lr"])
    good = [0, 1, 3, 5]
    assert float(np.max(np.abs(_col(jm, "loss")[good] - _col(tmx, "loss")[good]))) < 1e-4
    assert np.isnan(tmx[2]["grad_norm"]) and np.isnan(jm[2]["grad_norm"])
    assert np.isnan(tmx[4]["loss"]) and np.isnan(jm[4]["loss"])


# -- analysis -----------------------------------------------------------------------------
CASES = [("decoupled", ("null",)), ("standard", ()), ("bottleneck", ("tie_qk",)), ("gqa", ("null",))]


@pytest.mark.parametrize("mode,options", CASES, ids=[f"{m}-{'+'.join(o) or 'base'}" for m, o in CASES])
def test_torch_analysis_matches_jax(mode, options):
    cfg = make_config(mode, options)
    state = random_state(cfg, seed=3)
    jm, tm = build_jax(cfg, state), build_torch(cfg, state)
    idx = random_tokens(cfg, 2, 31, seed=5)
    spec = AnalysisSpec(level="full", every=1, max_tokens=31, layers=(0, cfg.n_layer - 1), heads=(0, cfg.n_head - 1),
                        topk=5, local_window=7, save_scores=True)
    graphdef, params, rest = nnx.split(jm, nnx.Param, ...)
    jmetrics, want = JaxAnalyzer(spec, graphdef, rest, cfg)(params, idx.astype(np.int32))  # the jitted pass
    got = {k: v.double().cpu().numpy() for k, v in torch_analyse(tm, torch.as_tensor(idx), spec).items()}
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        np.testing.assert_allclose(got[name], ref, rtol=2e-5, atol=2e-6, err_msg=name)
    # the Analyzer: the same event numbers as the JAX one's, the model's mode restored
    tm.train()
    metrics, arrays = TorchAnalyzer(spec, tm)(None, idx)
    assert tm.training and sorted(metrics) == sorted(jmetrics)
    for k, v in jmetrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=2e-5, atol=2e-6, err_msg=k)
    assert all(a.dtype == np.float32 for a in arrays.values())
