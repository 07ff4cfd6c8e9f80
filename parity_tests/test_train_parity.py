"""Training parity: the JAX step (train/step.py) and the torch step (torch_ref/train_step.py),
from identical weights and batches, give the same losses for 10 steps.

AdamW within 1e-4 relative; Lion within 1e-3 (its sign update turns float noise in a
near-zero momentum into a full +-lr step, so the two drift slightly faster).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

from flax import nnx  # noqa: E402

import jax_model  # noqa: E402
import torch_ref  # noqa: E402
from dba.config import ModelConfig  # noqa: E402
from torch_ref.train_step import TorchTrainer  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.step import Stepper  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


CFG = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=3, d_model=48, d_ff=96, embed_dim=48,
                  attn_mode="decoupled", attn_dim=48, sem_dim=12, geo_dim=24)


def _batches(n_steps, accum, b, t, seed=0):
    rng = np.random.default_rng(seed)
    # a learnable stream (a noisy periodic pattern) so the loss really moves
    base = np.arange(4000) * 7 % 97
    noise = rng.integers(0, 97, 4000)
    stream = np.where(rng.random(4000) < 0.2, noise, base).astype(np.int32)
    out = []
    for _ in range(n_steps):
        offs = rng.integers(0, len(stream) - t - 1, (accum, b))
        idx = offs[..., None] + np.arange(t + 1)
        w = stream[idx]
        out.append((w[..., :-1].copy(), w[..., 1:].copy()))
    return out


def _run_both(cfg, opt, opt_kwargs, accum=2, steps=10, lr=3e-3, schedule="cosine"):
    tm = torch_ref.DBAModel(cfg)
    torch.manual_seed(0)
    state = torch_ref.canonical_state(tm)
    jm = jax_model.DBAModel(cfg, rngs=nnx.Rngs(0))
    jax_model.load_canonical(jm, state)
    common = dict(lr=lr, total_steps=steps, grad_clip=1.0, lr_schedule=schedule, warmup_steps=2, min_lr=lr / 10,
                  **opt_kwargs)
    tx = build_optimizer(opt, **common)
    js = Stepper(jm, tx, seed=0)
    tt = TorchTrainer(tm, opt, **common)
    jl, tl = [], []
    for i, (x, y) in enumerate(_batches(steps, accum, 4, 16)):
        jl.append(float(js.train_step(x, y, i)["loss"]))
        tl.append(tt.step(x, y)["loss"])
    return np.array(jl), np.array(tl)


def test_adamw_10_steps_match():
    jl, tl = _run_both(CFG, "adamw", dict(weight_decay=0.1))
    assert jl[-1] < jl[0] - 0.1  # it trains
    np.testing.assert_allclose(jl, tl, rtol=1e-4)


@pytest.mark.parametrize("opt", ["lion", "lion_v29"])
def test_lion_10_steps_match(opt):
    jl, tl = _run_both(CFG, opt, dict(weight_decay=0.1, betas=(0.9, 0.99)), lr=1e-3, schedule="constant")
    assert jl[-1] < jl[0]
    np.testing.assert_allclose(jl, tl, rtol=1e-3)


def test_tie_qk_null_attn_adamw_match():
    cfg = CFG.replace(tie_qk=True, null_attn=True, embed_dim=36)
    jl, tl = _run_both(cfg, "adamw", dict(weight_decay=0.1, wd_exempt_1d=True), accum=1)
    np.testing.assert_allclose(jl, tl, rtol=1e-4)
