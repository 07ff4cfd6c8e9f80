"""Multi-device cases on 8 fake CPU devices. tests/test_mesh.py runs this file in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set before JAX is
imported, which the main pytest process has already done with one device). Not collected on its
own: the name has no test_ prefix.

The same steps on meshes 1, data=8, fsdp=8 and data=4,fsdp=2 agree up to float reassociation,
parameters and optimizer state really are split, and a checkpoint written on one mesh resumes on
another or on one device.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jax_model
from dba.config import ModelConfig
from dba.errors import UserError
from train import sharding
from train.orbax_checkpoints import RunCheckpoints
from train.config import OptimConfig
from train.optim import build_optimizer
from train.step import Stepper

pytestmark = pytest.mark.multidevice
if jax.device_count() != 8:  # a clear failure, not a silent skip: only test_mesh.py runs this file
    raise RuntimeError(f"multidevice_cases.py needs 8 devices (XLA_FLAGS), found {jax.device_count()}")

# Every split dimension divides by 8 (vocab 104, d_ff 88, widths 16/24/40, embed_dim 24).
CFG = ModelConfig(vocab_size=104, block_size=16, n_layer=1, n_head=4, d_model=40, d_ff=88, embed_dim=24,
                  attn_mode="decoupled", attn_dim=40, sem_dim=16, geo_dim=24)
MESHES = ("1", "data=8", "fsdp=8", "data=4,fsdp=2")
STEPS, A, B, T = 10, 2, 8, 16
RTOL = 1e-4


def batches():
    """A learnable stream (next = prev + 7 mod V, 20% noise), fixed windows per step."""
    rng = np.random.default_rng(0)
    start = rng.integers(0, CFG.vocab_size, (STEPS, A, B, 1))
    w = (start + 7 * np.arange(T + 1)) % CFG.vocab_size
    w = np.where(rng.random(w.shape) < 0.2, rng.integers(0, CFG.vocab_size, w.shape), w).astype(np.int32)
    return w[..., :-1], w[..., 1:]


def make(mesh_text: str) -> Stepper:
    model = jax_model.DBAModel(CFG, rngs=nnx.Rngs(0))
    tx = build_optimizer(OptimConfig(lr=3e-3, weight_decay=0.1), STEPS)
    return Stepper(model, tx, seed=0, mesh=sharding.make_mesh(sharding.parse_mesh(mesh_text)))


def train(st: Stepper, start: int, stop: int) -> tuple[list[float], list[float]]:
    xs, ys = batches()
    losses, norms = [], []
    for s in range(start, stop):
        m = st.train_step(st.put_batch(xs[s]), st.put_batch(ys[s]), s)
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    return losses, norms


def eval_loss(st: Stepper) -> float:
    xs, ys = batches()
    return float(st.eval_loss(st.put_batch(xs[:3, 0]), st.put_batch(ys[:3, 0])))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """10 steps per mesh; the data=4,fsdp=2 run also writes a checkpoint at step 5."""
    out = {}
    for m in MESHES:
        st = make(m)
        l0, n0 = train(st, 0, 5)
        if m == "data=4,fsdp=2":
            ckpts = RunCheckpoints(tmp_path_factory.mktemp("run"))
            ckpts.save("last", 5, st, 0, {"note": "x"})
            out["ckpt"] = (ckpts, jax.device_get(st.params))
        l1, n1 = train(st, 5, STEPS)
        out[m] = {"stepper": st, "loss": l0 + l1, "grad_norm": n0 + n1, "eval": eval_loss(st)}
    return out


def test_same_steps_on_every_mesh(runs):
    ref = runs["1"]
    assert ref["loss"][-1] < ref["loss"][0]  # it trains
    for m in MESHES[1:]:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(runs[m][key], ref[key], rtol=RTOL, err_msg=f"{m} {key}")
        np.testing.assert_allclose(runs[m]["eval"], ref["eval"], rtol=RTOL, err_msg=f"{m} eval")
        assert runs[m]["stepper"].trace_count == 1


def test_parameters_and_optimizer_state_are_split(runs):
    full = sharding.per_device_bytes(runs["1"]["stepper"].params)
    for m, shape in (("fsdp=8", (1, 8)), ("data=4,fsdp=2", (4, 2)), ("data=8", (8, 1))):
        st, fsdp = runs[m]["stepper"], shape[1]
        assert sharding.mesh_shape(st.mesh) == {"data": shape[0], "fsdp": fsdp}
        emb = st.params["tok_emb"]["embedding"][...]
        w1 = st.params["blocks"][0]["ff"]["w1"]["kernel"][...]
        w3 = st.params["blocks"][0]["ff"]["w3"]["kernel"][...]
        q = st.params["blocks"][0]["attn"]["q_geo"]["kernel"][...]
        ln = st.params["blocks"][0]["ln1"]["scale"][...]
        if fsdp == 1:
            assert all(a.sharding.spec == P() for a in (emb, w1, w3, q, ln))
            assert sharding.per_device_bytes(st.params) == full
            continue
        # the step's outputs keep the rules' layout: vocab, d_ff and head widths split, norms whole
        assert emb.sharding.spec == P("fsdp", None) and emb.addressable_shards[0].data.shape == (104 // fsdp, 24)
        assert w1.sharding.spec == P(None, "fsdp") and w1.addressable_shards[0].data.shape == (40, 88 // fsdp)
        assert w3.sharding.spec == P("fsdp", None)
        assert q.sharding.spec == P(None, "fsdp")
        assert ln.sharding.spec == P() and len(ln.sharding.device_set) == 8
        # optimizer moments follow their parameter
        mus = [x for p, x in jax.tree_util.tree_flatten_with_path(st.opt_state)[0]
               if "mu" in sharding.path_names(p) and sharding.path_names(p)[-2:] == ["w1", "kernel"]]
        assert mus and all(x.sharding.spec == P(None, "fsdp") for x in mus)
        # the per-device footprint shrinks ~1/fsdp (only the replicated small tensors stay whole)
        per = sharding.per_device_bytes(st.params)
        assert full / fsdp <= per < 1.15 * full / fsdp, (m, per, full)
        assert sharding.per_device_bytes(st.opt_state) < 1.15 * 2 * full / fsdp  # adam: mu and nu


def test_batch_rows_split_over_both_axes(runs):
    st = runs["data=4,fsdp=2"]["stepper"]
    xs, _ = batches()
    x = st.put_batch(xs[0])
    assert x.shape == (A, B, T) and x.sharding.shard_shape(x.shape) == (A, 1, T)
    assert st.local_rows(B) == slice(0, B)  # one process feeds every row


@pytest.mark.parametrize("target", ["1", "fsdp=8"])
def test_checkpoint_from_data4_fsdp2_resumes_elsewhere(runs, target):
    """The step-5 checkpoint of the data=4,fsdp=2 run, restored into the (already compiled)
    stepper of another mesh, continues exactly like the single-device run."""
    ckpts, saved = runs["ckpt"]
    dst = runs[target]["stepper"]
    params, opt_state, step, meta = ckpts.restore_state("last", dst.params, dst.opt_state)
    assert step == 5 and meta["note"] == "x"
    assert meta["devices"] == {"mesh": {"data": 4, "fsdp": 2}, "device_count": 8, "platform": "cpu",
                               "process_count": 1}
    dst.set_state(params, opt_state)
    for a, b, sh in zip(jax.tree.leaves(dst.params), jax.tree.leaves(saved), jax.tree.leaves(dst.param_sharding)):
        assert a.sharding == sh  # restored onto the target layout, not the writer's
        np.testing.assert_array_equal(np.asarray(a), b)
    losses, norms = train(dst, 5, STEPS)
    np.testing.assert_allclose(losses, runs["1"]["loss"][5:], rtol=RTOL)
    np.testing.assert_allclose(norms, runs["1"]["grad_norm"][5:], rtol=RTOL)
    assert dst.compiles == 1


@pytest.mark.parametrize("text,needle", [
    ("data=3", "multiply to 3 but 8 devices"),
    ("data=4,fsdp=4", "multiply to 16 but 8 devices"),
    ("data=3,fsdp=-1", "cannot be split into groups of 3"),
])
def test_unsatisfiable_mesh_one_line(text, needle):
    with pytest.raises(UserError) as e:
        sharding.make_mesh(sharding.parse_mesh(text))
    assert needle in str(e.value) and "\n" not in str(e.value) and e.value.code == 2


def test_minus_one_takes_the_remaining_devices():
    assert sharding.mesh_shape(sharding.make_mesh(sharding.parse_mesh("data=2,fsdp=-1"))) == {"data": 2, "fsdp": 4}


def test_indivisible_batch_refused_before_compiling():
    st = make("data=8")
    x = np.zeros((1, 4, T), np.int32)
    with pytest.raises(UserError) as e:
        st.compile_for(x, x)
    assert "not divisible by the mesh's batch axes (data=8 = 8)" in str(e.value)
    assert st.trace_count == 0 and st.compiles == 0
