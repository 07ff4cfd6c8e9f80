"""Optimizer parity: the optax chain (train.optim), the torch optimizers (torch_ref.optim, built
as the torch trainer builds them) and a numpy reference written here from SPEC §7 give the same
parameters and learning rates for the same gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from dba.errors import UserError
from torch_ref.optim import Lion, clip_by_global_norm, global_norm
from torch_train.step import make_optimizer
from train.config import OptimConfig
from train.optim import build_optimizer as build_jax, current_lr, decay_mask, lion_v29

# (name, shape): an embedding, a matrix, a bias, a norm scale. Names contain the JAX path parts
# so one exemption rule ("tok_emb" or ndim <= 1) applies identically on both sides.
SHAPES = {"tok_emb.embedding": (16, 8), "blk.kernel": (8, 12), "blk.bias": (12,), "ln.scale": (8,)}
STEPS = 6
LR, WD, CLIP, MIN_LR, WARMUP = 1e-2, 0.1, 1.0, 1e-3, 2


def _data(seed=0):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    # scale 3: the global norm is far above CLIP, so clipping is active every step
    grads = [{k: (3.0 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
             for _ in range(STEPS)]
    return params, grads


def _nest(flat):
    out = {}
    for k, v in flat.items():
        a, b = k.split(".")
        out.setdefault(a, {})[b] = v
    return out


def _flat(nested):
    return {f"{a}.{b}": np.asarray(v) for a, d in nested.items() for b, v in d.items()}


# ---------------------------------------------------------------- numpy reference (SPEC §7)


def ref_lr(step, schedule):
    if step < WARMUP:
        return LR * step / WARMUP
    if schedule == "constant":
        return LR
    frac = min(step - WARMUP, STEPS - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * frac))


def ref_run(name, params, grads, schedule, exempt):
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2 = (0.9, 0.95) if name == "adamw" else (0.9, 0.99)
    for t, g32 in enumerate(grads):
        g = {k: x.astype(np.float64) for k, x in g32.items()}
        norm = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
        assert norm > CLIP
        g = {k: x * (CLIP / norm) for k, x in g.items()}
        lr = ref_lr(t, schedule)
        for k in p:
            wd = 0.0 if exempt and ("tok_emb" in k or p[k].ndim <= 1) else WD
            p[k] = p[k] * (1.0 - lr * wd)  # decoupled decay first, on the old p
            if name == "adamw":
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
                mh, vh = m[k] / (1 - b1 ** (t + 1)), v2[k] / (1 - b2 ** (t + 1))
                p[k] = p[k] - lr * mh / (np.sqrt(vh) + 1e-8)
                continue
            c = b1 * m[k] + (1 - b1) * g[k]
            # no near-ties: fp32 rounding of c (~1e-9 here) cannot flip its sign
            assert np.abs(c).min() > 1e-7
            p[k] = p[k] - lr * np.sign(c)
            m[k] = b2 * (m[k] if name == "lion" else c) + (1 - b2) * g[k]
    return p


# ---------------------------------------------------------------- the two frameworks


def _optim(name, schedule, exempt):
    return OptimConfig(name=name, lr=LR, weight_decay=WD, wd_exempt_1d=exempt, grad_clip=CLIP, lr_schedule=schedule,
                       warmup_steps=WARMUP, min_lr=MIN_LR)


def jax_run(name, params, grads, schedule, exempt):
    tx = build_jax(_optim(name, schedule, exempt), STEPS)
    p = jax.tree.map(jnp.asarray, _nest(params))
    state = tx.init(p)
    lrs = []
    for g in grads:
        upd, state = tx.update(jax.tree.map(jnp.asarray, _nest(g)), state, p)
        p = optax.apply_updates(p, upd)
        lrs.append(current_lr(state))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    return _flat(p), lrs


def torch_run(name, params, grads, schedule, exempt):
    """The torch trainer's sequence (torch_train/step.py): lr from the schedule at the update
    count, optax's global-norm clip, then torch_ref's optimizer."""
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    o = _optim(name, schedule, exempt)
    sched = o.schedule(STEPS)
    opt = make_optimizer(list(tp.items()), o, torch.zeros(()))
    lrs = []
    for t, g in enumerate(grads):
        lr = sched.at(torch.tensor(float(t)), torch).to(torch.float32)
        for group in opt.param_groups:
            group["lr"] = lr
        lrs.append(float(lr))
        norm, _ = global_norm([torch.from_numpy(g[k]) for k in tp])
        assert float(norm) > CLIP
        for v, clipped in zip(tp.values(), clip_by_global_norm([torch.from_numpy(g[k].copy()) for k in tp], CLIP, norm)):
            v.grad = clipped
        opt.step()
    return {k: v.detach().numpy() for k, v in tp.items()}, lrs


@pytest.mark.parametrize("exempt", [False, True], ids=["wd_all", "wd_exempt_1d"])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("name", ["lion", "lion_v29", "adamw"])
def test_optax_torch_numpy_agree(name, schedule, exempt):
    params, grads = _data()
    pj, lrs_j = jax_run(name, params, grads, schedule, exempt)
    pt, lrs_t = torch_run(name, params, grads, schedule, exempt)
    pr = ref_run(name, params, grads, schedule, exempt)
    expected_lrs = [ref_lr(t, schedule) for t in range(STEPS)]
    np.testing.assert_allclose(lrs_j, expected_lrs, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lrs_t, expected_lrs, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(lrs_t, lrs_j)  # one formula, evaluated in fp32 by both
    for k in SHAPES:
        for got in (pj[k], pt[k]):
            np.testing.assert_allclose(got, pr[k], rtol=1e-6, atol=1e-7, err_msg=k)
        # the displacement, not just the parameter: catches a wrong update hiding under |p| ~ 1
        # (floor: a few fp32 ulps of |p| per step, ~1e-6 here, far below lr*wd*|p| or a sign flip)
        atol = 2 * STEPS * np.finfo(np.float32).eps * float(np.abs(params[k]).max())
        dt, dj, dr = pt[k] - params[k], pj[k] - params[k], pr[k] - params[k]
        np.testing.assert_allclose(dj, dr, rtol=0, atol=atol, err_msg=k)
        np.testing.assert_allclose(dt, dr, rtol=0, atol=atol, err_msg=k)
    moved = max(float(np.abs(pr[k] - params[k]).max()) for k in SHAPES)
    assert moved > LR  # the run really moved the parameters


def test_exemption_changes_the_result():
    params, grads = _data()
    a = ref_run("lion", params, grads, "constant", False)
    b = ref_run("lion", params, grads, "constant", True)
    assert not np.allclose(a["ln.scale"], b["ln.scale"])
    assert np.allclose(a["blk.kernel"], b["blk.kernel"])


def test_decay_mask_paths():
    p = {"tok_emb": {"embedding": jnp.ones((4, 3))}, "blk": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
         "scalar": jnp.ones(())}
    assert decay_mask(p) == {"tok_emb": {"embedding": False}, "blk": {"kernel": True, "bias": False},
                             "scalar": False}


def _two_steps_jax(tx, g1, g2, p0):
    p, state = p0, tx.init(p0)
    for g in (g1, g2):
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    return np.asarray(p)


def test_lion_v29_differs_from_paper_after_two_steps():
    """Step 1 is identical (m = 0). With g2 = -g1/2 the second-step combinations are
    paper: b1*(1-b2)*g1 - (1-b1)*g1/2 = -0.041*g1, v29: b1*(b2*(1-b1) + 1-b2)*g1 - 0.05*g1 = +0.0481*g1,
    opposite signs, so every element ends 2*lr apart (SPEC §7's measurement)."""
    lr = 3e-4
    rng = np.random.default_rng(1)
    g1 = jnp.asarray(rng.standard_normal(64).astype(np.float32))
    g2 = -0.5 * g1
    p0 = jnp.asarray(rng.standard_normal(64).astype(np.float32))
    paper = optax.chain(optax.scale_by_lion(), optax.scale(-lr))
    v29 = optax.chain(lion_v29(), optax.scale(-lr))
    one = (_two_steps_jax(paper, g1, jnp.zeros_like(g1), p0), _two_steps_jax(v29, g1, jnp.zeros_like(g1), p0))
    np.testing.assert_array_equal(one[0], one[1])  # a zero second gradient keeps the signs equal
    a = _two_steps_jax(optax.lion(lr, weight_decay=0.0), g1, g2, p0)
    b = _two_steps_jax(v29, g1, g2, p0)
    np.testing.assert_allclose(np.abs(a - b), 2 * lr, rtol=1e-3)
    # p2 = p0 - lr*s1 - lr*s2 with s2 = +sign(g1) for v29 and -sign(g1) for the paper
    np.testing.assert_allclose(b - a, -2 * lr * np.sign(np.asarray(g1)), rtol=1e-3)

    # the torch variants show the same split
    out = {}
    for variant in ("paper", "v29"):
        tp = torch.nn.Parameter(torch.from_numpy(np.asarray(p0).copy()))
        opt = Lion([tp], lr=lr, variant=variant)
        for g in (g1, g2):
            tp.grad = torch.from_numpy(np.asarray(g).copy())
            opt.step()
        out[variant] = tp.detach().numpy()
    np.testing.assert_allclose(out["paper"], a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["v29"], b, rtol=1e-6, atol=1e-7)


def test_sign_zero_gives_no_step():
    # A parameter whose gradients are all zero has c = 0: sign(0) = 0, so only decay moves it.
    lr, wd = 0.1, 0.5
    p0 = {"w": jnp.ones((2, 2))}
    g = {"w": jnp.zeros((2, 2))}
    tx = build_jax(OptimConfig(name="lion_v29", lr=lr, weight_decay=wd, grad_clip=0.0), 1)
    u, _ = tx.update(g, tx.init(p0), p0)
    np.testing.assert_allclose(np.asarray(optax.apply_updates(p0, u)["w"]), 1 - lr * wd, rtol=1e-6)
    tp = torch.nn.Parameter(torch.ones(2, 2))
    tp.grad = torch.zeros(2, 2)
    Lion([tp], lr=lr, weight_decay=wd, variant="v29").step()
    np.testing.assert_allclose(tp.detach().numpy(), 1 - lr * wd, rtol=1e-6)


def test_bad_optimizer_settings_are_one_line():
    with pytest.raises(UserError, match="lion_v29"):
        OptimConfig(name="sgd")
    with pytest.raises(UserError, match="cosine"):
        OptimConfig(name="lion", lr_schedule="linear")
    with pytest.raises(UserError, match="warmup"):  # the run length is known when the schedule is built
        OptimConfig(name="lion", lr_schedule="cosine", warmup_steps=10).schedule(10)
    with pytest.raises(ValueError, match="sgd"):
        import torch_ref.optim

        torch_ref.optim.make("sgd", [torch.zeros(1, requires_grad=True)], lr=1e-3, betas=(0.9, 0.99))
