"""`dba train`: end to end on a toy model, resume (by --steps and by SIGINT/SIGTERM) equals a
straight run, the curriculum compiles once per length and grows the context, grad accumulation
and rematerialisation change nothing, and user mistakes are one-line errors.

CLI runs go through a subprocess (`python -m cli train ...`) like a user's would.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from dba.runlog import read_events
from tests.support import SEED_FLAGS, hardware_skip, dba_train, export_step, losses, ok, one_line_error, popen_train


# ---- end to end with the seed's flags, scaled to a toy; it doubles as the straight run -----

@pytest.fixture(scope="module")
def seed_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "seed_toy"
    r = ok(dba_train("--data", data, "--steps", 8, *SEED_FLAGS, "--live", "rich", "--out-dir", out))
    return out, r


@pytest.mark.slow
def test_seed_flags_end_to_end_artifacts(seed_run):
    out, r = seed_run
    assert f"run dir {out}" in r.stdout.splitlines()[0] and str(out) in r.stdout.splitlines()[-1]
    ev = read_events(out / "train.jsonl")
    kinds = [e["event"] for e in ev]
    assert kinds[0] == "meta" and kinds[-1] == "done" and {"train", "eval"} <= set(kinds)
    meta, done = ev[0], ev[-1]
    assert meta["config"]["block_size"] == 32 and meta["config"]["embed_dim"] == 36
    assert meta["context"]["grown"] and meta["context"]["requested_block_size"] == 16
    assert meta["flags"]["instrument"] == "full" and meta["flags"]["analysis_every"] == 100
    for k in ("python", "jax", "flax", "optax", "backend", "device_count"):
        assert k in meta["env"]
    assert meta["n_params"] > 0
    train = [e for e in ev if e["event"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 9))
    assert [e["seq_len"] for e in train] == [16, 16, 16] + [32] * 5
    for e in train:
        assert e["grad_accum"] == 2 and e["global_batch"] == 8 and e["tok_s"] > 0 and e["step_ms"] > 0
        assert np.isfinite(e["loss"]) and e["grad_norm_total"] > 0 and abs(e["lr"] - 3e-4) < 1e-9
    evals = [e for e in ev if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 4, 8]
    assert all(set(e) >= {"train_loss", "val_loss", "val_ppl", "best_val"} for e in evals)
    # one compile per distinct length, and the context grew to the longest
    assert done["reason"] == "complete" and done["step"] == 8
    assert done["compiles"] == 2 and done["trace_count"] == 2 and done["lengths"] == [16, 32]
    assert done["best_val"] == min(e["val_loss"] for e in evals if e["step"] > 0)

    # On disk the records are v29's: a "type" key and v29's field names, for v29's own readers.
    raw = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert all("type" in rec and "event" not in rec for rec in raw)
    need = {"meta": {"config", "args"}, "train": {"step", "loss", "lr", "tok_s"},
            "eval": {"step", "train_loss", "val_loss", "best_val"}, "done": {"step", "best_val"}}
    for kind, fields in need.items():
        recs = [rec for rec in raw if rec["type"] == kind]
        assert recs and all(fields <= set(rec) for rec in recs), kind
    assert raw[0]["args"]["seq_schedule"] == raw[0]["flags"]["seq_schedule"]

    summary = (out / "summary.md").read_text()
    for needle in ("# Run Summary", "- Created:", "- Out dir:", "- Device:", "- Command: `dba train", "## Model Config",
                   "## Training Args", "## Results", "- Best val loss:", "## KV Cache Memory (batch=1)",
                   "Baseline fp16 (standard attn) @ ctx=32", "Compression vs fp16 baseline", "@ 128k", "grown from 16 to 32",
                   "k_sem=q4_0", "k_geo=q8_0"):
        assert needle in summary, needle
    for kind in ("last", "best"):
        steps = [p.name for p in (out / "checkpoints" / kind).iterdir() if p.name.isdigit()]
        assert steps, kind
        assert (out / f"{kind}.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints" / "last").iterdir() if p.name.isdigit()] == ["8"]


@pytest.mark.slow
def test_run_dir_loads_in_torch_and_jax(seed_run):
    torch_ref = pytest.importorskip("torch_ref")
    import jax_model

    out, _ = seed_run
    tm = torch_ref.load(out, device="cpu")
    jm = jax_model.load(out)
    assert tm.cfg == jm.cfg and tm.cfg.block_size == 32
    x = np.random.default_rng(1).integers(0, 97, (2, 32))
    a = tm(x).detach().numpy()
    b = np.asarray(jm(x))
    assert np.abs(a - b).max() <= 2e-5
    from dba.weight_files import read_weights

    _, _, info = read_weights(out / "last.safetensors")
    assert info["metadata"]["step"] == "8"


@pytest.mark.slow
def test_existing_out_dir_refused(seed_run):
    out, _ = seed_run
    r = dba_train("--steps", 1, "--out-dir", out)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- resume: --steps 3, then SIGINT, then SIGTERM, then to the end = the straight run ------

@pytest.mark.slow
def test_resume_by_steps_and_signals_equals_straight(seed_run, data, tmp_path):
    straight, _ = seed_run
    out = tmp_path / "split"
    ok(dba_train("--data", data, "--steps", 3, *SEED_FLAGS, "--live", "basic", "--out-dir", out))
    # Each resumed leg is signalled at its start line: it stops before its first step or, when
    # the signal lands during the compile (for length 32), right after it; it saves and exits
    # 130 (SIGINT) / 143 (SIGTERM).
    last = 3
    for args, sig, code in ((["--resume", "--steps", 8], signal.SIGINT, 130),
                            (["--resume", "--steps", 8], signal.SIGTERM, 143)):
        p = popen_train("--out-dir", out, *args)
        seen = []
        for line in p.stdout:  # the handlers are installed before the "run dir" line
            seen.append(line)
            if "run dir" in line:
                p.send_signal(sig)
                break
        rest, _ = p.communicate(timeout=300)
        assert p.returncode == code, "".join(seen) + rest
        done = read_events(out / "train.jsonl", "done")[-1]
        assert done["reason"] == {signal.SIGINT: "sigint", signal.SIGTERM: "sigterm"}[sig]
        assert last <= done["step"] <= last + 1
        last = done["step"]
        assert (out / "last.safetensors").is_file()
    for f in (out / "checkpoints" / "best").rglob("*"):  # an unreadable 'best': resuming needs only 'last'
        if f.is_file():
            f.write_bytes(b"{x")
    r = ok(dba_train("--out-dir", out, "--resume", "--steps", 8, "--live", "off"))
    # --live off: the start lines, the warning and the end line only
    assert len(r.stdout.strip().splitlines()) == 5, r.stdout
    assert "warning: the 'best' checkpoint cannot be read" in r.stdout
    assert export_step(out / "best.safetensors") == 8  # the next evaluation wrote a new best
    assert losses(out) == losses(straight)
    split_evals, straight_evals = losses(out, "eval", "val_loss"), losses(straight, "eval", "val_loss")
    # the first leg also evaluated at its end (3); a signalled leg skips its eval to stop fast
    assert {0, 3, 8} <= set(split_evals) <= set(straight_evals) | {3}
    assert all(split_evals[k] == straight_evals[k] for k in split_evals if k != 3)
    metas = read_events(out / "train.jsonl", "meta")
    assert [m["resumed_from"] for m in metas][:2] == [None, 3] and len(metas) == 4


# ---- step functions ------------------------------------------------------------------------

def _stepper(remat=False, cfg_over=None, **kw):
    from flax import nnx

    import jax_model
    from dba.config import ModelConfig
    from train.config import OptimConfig
    from train.optim import build_optimizer
    from train.step import Stepper

    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=3, d_model=48, d_ff=96, embed_dim=48,
                      attn_mode="decoupled", attn_dim=48, sem_dim=12, geo_dim=24, **(cfg_over or {}))
    model = jax_model.DBAModel(cfg, rngs=nnx.Rngs(0), remat=remat, **kw)
    return Stepper(model, build_optimizer(OptimConfig(lr=3e-3, weight_decay=0.1), 10), seed=0)


def _xy(a, b, t=16, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 97, (a, b, t + 1)).astype(np.int32)
    return w[..., :-1], w[..., 1:]


@pytest.mark.slow  # ~4 s: three steppers compiled
def test_grad_accum_equals_one_big_batch():
    import jax

    acc, big = _stepper(), _stepper()
    for s in range(3):
        x, y = _xy(2, 4, seed=s)
        la = acc.train_step(x, y, s)
        lb = big.train_step(x.reshape(1, 8, 16), y.reshape(1, 8, 16), s)
        np.testing.assert_allclose(float(la["loss"]), float(lb["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(la["grad_norm"]), float(lb["grad_norm"]), rtol=1e-5)
    # Adam divides by sqrt(v): float noise in a near-zero gradient moves a weight by a fraction
    # of one lr-sized step, so parameters agree to a small fraction of lr (3e-3), not to 1e-6.
    for pa, pb in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(np.asarray(pa), np.asarray(pb), rtol=0, atol=6e-5)
    assert acc.trace_count == 1 and big.trace_count == 1


@pytest.mark.slow
def test_grad_checkpoint_changes_nothing():
    """--grad-checkpoint rematerialises each block (one checkpoint region per block in the step's
    program, none without it) and gives the same losses."""
    import re

    import jax

    plain, remat = _stepper(), _stepper(remat=True)
    x, y = _xy(1, 4)
    regions = [len(re.findall(r"\b(?:checkpoint|remat\d*)\[", str(jax.make_jaxpr(st._train_impl)(
        st.params, st.opt_state, st.faults, x, y, np.int32(0), st.t_params)))) for st in (plain, remat)]
    assert regions == [0, 2]  # n_layer = 2
    for s in range(3):
        x, y = _xy(1, 4, seed=s)
        lp, lr_ = plain.train_step(x, y, s), remat.train_step(x, y, s)
        np.testing.assert_allclose(float(lp["loss"]), float(lr_["loss"]), rtol=1e-5)


@pytest.mark.slow
def test_one_compile_per_length_with_dropout():
    s = _stepper(cfg_over={"dropout": 0.1})
    for i, t in enumerate([16, 16, 32, 16, 32]):
        assert np.isfinite(float(s.train_step(*_xy(1, 2, t=t, seed=i), i)["loss"]))
    assert s.trace_count == 2 and s.compiles == 2
    x, y = _xy(3, 2, t=16)
    assert np.isfinite(float(s.eval_loss(x, y)))


@pytest.mark.slow
def test_bf16_params_and_compute_step():
    import jax.numpy as jnp

    s = _stepper(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x, y = _xy(1, 2, t=16)
    first = float(s.train_step(x, y, 0)["loss"])
    assert abs(first - np.log(97)) < 0.05  # the fp32 model starts at ln(V) too (init std 0.02)
    assert s.params["tok_emb"]["embedding"][...].dtype == jnp.bfloat16


# ---- flags and errors (no JAX needed: these stop before importing it) ----------------------

@pytest.mark.slow
@pytest.mark.parametrize("args,code,needle", [
    (["--no-such-flag"], 2, "unrecognized arguments"),
    (["--optimizer", "sgd"], 2, "invalid choice"),
    (["--seq-schedule", "16@0,8@x"], 2, "16@0,8@x"),
    (["--device", "mps"], 1, "no MPS device"),  # PyTorch would train; this machine has none
    (["--data", "/nonexistent/tokens.npy"], 2, "data file not found"),
    (["--lion-betas", "0.9"], 2, "--lion-betas"),
    (["--steps", "0"], 2, "--steps"),
    (["--resume", "--overwrite"], 2, "contradict"),
    (["--n-head", "5"], 2, "not divisible by n_head=5"),
])
def test_bad_flags_one_line(args, code, needle, tmp_path):
    r = dba_train(*args, "--out-dir", tmp_path / "x", cwd=tmp_path)
    assert needle in one_line_error(r, code)


@pytest.mark.slow
def test_bad_data_one_line(tmp_path, data):
    short = tmp_path / "short.npy"
    np.save(short, np.arange(20, dtype=np.uint16))
    r = dba_train("--data", short, "--train-seq-len", 64, "--out-dir", tmp_path / "x")
    assert "fewer than seq_len + 1" in one_line_error(r, 2)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    assert "not a readable .npy" in one_line_error(dba_train("--data", bad, "--out-dir", tmp_path / "y"), 1)
    r = dba_train("--data", data, "--vocab-size", 50, "--out-dir", tmp_path / "z")
    assert "out of range for vocab_size" in one_line_error(r, 2)


SEED_COMMAND = ("--mode train --device cpu --data {data} --data-format npy --vocab-size 97 --steps 6000 --d-model 96 "
                "--layers 2 --n-head 12 --d-ff 384 --embed-dim 64 --optimizer lion --lr 3e-4 --batch-size 8 "
                "--grad-accum 2 --train-seq-len 512 --seq-schedule 256@0,512@500,1024@2000 --eval-every 200 "
                "--eval-iters 20 --log-every 10 --instrument full --analysis-every 100 --live rich --param-dtype bf16 "
                "--amp --amp-dtype bf16 --seed 1337 --out-dir runs/m4max_decoupled_48_96_seed1337 --attn-mode "
                "decoupled --attn-dim 144 --sem-dim 48 --geo-dim 96")


@pytest.mark.slow
def test_seed_command_parses_and_resolves(data, tmp_path):
    r = ok(dba_train(*SEED_COMMAND.format(data=data).split(), "--print-config", cwd=tmp_path))
    out = json.loads(r.stdout)
    m, a = out["model"], out["args"]
    assert (m["d_model"], m["n_layer"], m["n_head"], m["embed_dim"], m["attn_mode"]) == (96, 2, 12, 64, "decoupled")
    assert (m["sem_dim"], m["geo_dim"], m["attn_dim"], m["vocab_size"]) == (48, 96, 144, 97)
    assert m["block_size"] == 1024 and out["context"]["longest_train_len"] == 1024  # never capped at 256
    assert a["optimizer"] == "lion" and a["lion_betas"] == "0.9,0.99" and a["param_dtype"] == "bf16" and a["amp"]
    assert a["instrument"] == "full" and a["grad_accum"] == 2
    assert not (tmp_path / "runs").exists()  # --print-config creates nothing


@pytest.mark.slow
def test_no_arg_defaults_go_to_runs_default(tmp_path):
    out = json.loads(ok(dba_train("--print-config", cwd=tmp_path)).stdout)
    assert out["run_dir"] == os.path.join("runs", "default")
    m = out["model"]
    assert m["attn_mode"] == "decoupled" and m["vocab_size"] == 256 and m["block_size"] == out["args"]["train_seq_len"]
    named = json.loads(ok(dba_train("--print-config", "--lr", "1e-3", cwd=tmp_path)).stdout)
    assert named["run_dir"].startswith(os.path.join("runs", "dba-decoupled-"))
    tagged = json.loads(ok(dba_train("--print-config", "--run-tag", "exp1", cwd=tmp_path)).stdout)
    assert tagged["run_dir"] == os.path.join("runs", "exp1")


def test_clear_run_removes_only_run_files(tmp_path):
    from dba.run_dir import clear_run, holds_run

    (tmp_path / "checkpoints" / "last").mkdir(parents=True)
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    assert holds_run(tmp_path)
    clear_run(tmp_path)
    assert not holds_run(tmp_path) and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_unavailable_device_one_line(tmp_path):
    import importlib.util

    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")):
        hardware_skip("this machine has a JAX GPU/TPU plugin: the accelerator may really be there")
    r = dba_train("--backend", "jax", "--device", "gpu", "--steps", 1, "--out-dir", tmp_path / "x")
    assert "JAX cannot use this platform" in one_line_error(r, 1)
    # without --backend, a GPU JAX cannot serve goes to PyTorch, which has none here either
    r = dba_train("--device", "gpu", "--steps", 1, "--out-dir", tmp_path / "x")
    assert "PyTorch sees no CUDA device" in one_line_error(r, 1)
    assert not (tmp_path / "x").exists()
