"""Instrumentation: analysis metrics on hand-built attention patterns, gradient norms by group,
an `--instrument full --tb` run's artifacts (analysis events, row-stochastic analysis.h5, a real
analysis.png, TensorBoard scalars), analysis.h5 surviving SIGKILL, the live dashboard, and
`dba report` on a decoupled and a standard run.
"""

from __future__ import annotations

import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dba.errors import UserError
from tests.support import ENV, REPO, TOY, dba_train, ok
from train.analysis import effective_rank, local_mass, parse_indices, row_entropy, stable_rank, topk_mass
from dba.runlog import read_events

T = 11


def _uniform_causal(t=T):
    mask = np.tril(np.ones((t, t)))
    return jnp.asarray((mask / mask.sum(-1, keepdims=True))[None, None], jnp.float32)


# -- metric kernels on hand-built patterns -------------------------------------------------------
def test_uniform_rows():
    p = _uniform_causal()
    n = np.arange(1, T + 1)  # row i sees i + 1 keys
    np.testing.assert_allclose(row_entropy(p)[0, 0], np.log(n), rtol=1e-6)
    np.testing.assert_allclose(topk_mass(p, 4)[0, 0], np.minimum(4, n) / n, rtol=1e-6)
    np.testing.assert_allclose(local_mass(p, 3)[0, 0], np.minimum(3, n) / n, rtol=1e-6)


def test_one_hot_rows():
    p = jnp.eye(T, dtype=jnp.float32)[None, None]  # every query attends to itself
    np.testing.assert_allclose(row_entropy(p)[0, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(topk_mass(p, 1)[0, 0], 1.0)
    np.testing.assert_allclose(local_mass(p, 1)[0, 0], 1.0)
    np.testing.assert_allclose(effective_rank(jnp.linalg.svd(p[0, 0], compute_uv=False)), T, rtol=1e-5)
    first = jnp.zeros((T, T)).at[:, 0].set(1.0)  # every query on key 0: a rank-1 matrix
    np.testing.assert_allclose(effective_rank(jnp.linalg.svd(first, compute_uv=False)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(local_mass(first[None, None], 1)[0, 0], np.eye(T)[:, 0])


def test_known_local_band():
    band = 4
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    inside = (i - j >= 0) & (i - j < band)
    p = jnp.asarray((inside / inside.sum(-1, keepdims=True))[None, None], jnp.float32)
    n = np.minimum(np.arange(1, T + 1), band)
    np.testing.assert_allclose(local_mass(p, band)[0, 0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(local_mass(p, 2)[0, 0], np.minimum(2, n) / n, rtol=1e-6)
    np.testing.assert_allclose(local_mass(p, 100)[0, 0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(row_entropy(p)[0, 0], np.log(n), rtol=1e-6)


def test_null_mass_counts_in_entropy():
    p = _uniform_causal() * 0.5  # half of every row on the null key
    p0 = jnp.full((1, 1, T), 0.5)
    n = np.arange(1, T + 1)
    want = -(0.5 * np.log(0.5) + n * (0.5 / n) * np.log(0.5 / n))
    np.testing.assert_allclose(row_entropy(p, p0)[0, 0], want, rtol=1e-6)


def test_stable_rank():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(13, 7)))
    np.testing.assert_allclose(stable_rank(jnp.asarray(q)), 7.0, rtol=1e-5)
    np.testing.assert_allclose(stable_rank(jnp.outer(jnp.arange(1.0, 6.0), jnp.arange(1.0, 4.0))), 1.0, rtol=1e-5)


def test_parse_indices():
    assert parse_indices("0,-1", 4, "analysis-layers", "layer") == (0, 3)
    assert parse_indices("-1,3", 4, "analysis-layers", "layer") == (3,)
    assert parse_indices("all", 3, "analysis-heads", "head") == (0, 1, 2)
    with pytest.raises(UserError, match="layer 4 is out of range"):
        parse_indices("4", 4, "analysis-layers", "layer")
    with pytest.raises(UserError, match="'x' is not an integer"):
        parse_indices("0,x", 4, "analysis-heads", "head")


# -- gradient norms by group ------------------------------------------------------------------
def test_group_grad_norms_partition_the_tree():
    from flax import nnx

    from jax_model import DBAModel
    from bench.parity_cases import make_config
    from train.grad_norms import group_grad_norms

    cfg = make_config("decoupled", ("null", "embed"))
    _, params, _ = nnx.split(DBAModel(cfg), nnx.Param, ...)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    got = {k: float(v) for k, v in group_grad_norms(grads, decoupled=True).items()}
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]}

    def norm(pred):
        return math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for k, v in flat.items() if pred(k)))

    assert got["grad_norm_embed"] == pytest.approx(norm(lambda k: "tok_emb" in k or "emb_in" in k or "emb_out" in k), rel=1e-5)
    assert got["grad_norm_attn"] == pytest.approx(norm(lambda k: "'attn'" in k), rel=1e-5)
    assert got["grad_norm_ffn"] == pytest.approx(norm(lambda k: "'ff'" in k), rel=1e-5)
    assert got["grad_norm_attn_sem"] == pytest.approx(norm(lambda k: "_sem" in k), rel=1e-5)
    assert got["grad_norm_attn_geo"] == pytest.approx(norm(lambda k: "_geo" in k), rel=1e-5)
    assert set(group_grad_norms(grads, decoupled=False)) == {"grad_norm_embed", "grad_norm_attn", "grad_norm_ffn"}


# -- an instrumented run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def instrumented(tmp_path_factory):
    rng = np.random.default_rng(0)
    base = np.arange(20_000) * 7 % 97
    toks = np.where(rng.random(20_000) < 0.2, rng.integers(0, 97, 20_000), base).astype(np.uint16)
    root = tmp_path_factory.mktemp("instr")
    np.save(root / "toy.npy", toks)
    out = root / "dec"
    r = ok(dba_train("--data", root / "toy.npy", "--vocab-size", 97, *TOY, "--null-attn", "--steps", 12,
                     "--eval-every", 6, "--eval-iters", 2, "--log-every", 3, "--batch-size", 4, "--train-seq-len", 32,
                     "--instrument", "full", "--analysis-every", 4, "--analysis-layers", "0,-1",
                     "--analysis-heads", "all", "--analysis-save-scores", "--analysis-max-tokens", 24,
                     "--tb", "--live", "basic", "--out-dir", out))
    return {"root": root, "out": out, "stdout": r.stdout, "data": root / "toy.npy"}


@pytest.mark.slow
def test_instrumented_run_events(instrumented):
    out = instrumented["out"]
    ana = read_events(out / "train.jsonl", "analysis")
    assert [a["step"] for a in ana] == [0, 4, 8, 12]
    for a in ana:
        for key in ("attn_entropy_mean", "attn_topk_mass_mean", "attn_local_mass_mean", "attn_null_mass_mean",
                    "sem_energy_ratio_mean", "geo_energy_ratio_mean", "attn_erank_mean", "proj_stable_rank_mean"):
            assert isinstance(a[key], float) and math.isfinite(a[key]), key
        assert a["sem_energy_ratio_mean"] + a["geo_energy_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert 0 < a["attn_null_mass_mean"] < 1 and 0 < a["attn_topk_mass_mean"] <= 1
        assert 1.0 <= a["attn_erank_mean"] <= 24 and a["attn_entropy_mean"] <= math.log(25) + 1e-6
        assert len(a["attn_entropy_by_layer"]) == 2
    for t in read_events(out / "train.jsonl", "train"):
        for g in ("embed", "attn", "ffn", "attn_sem", "attn_geo"):
            assert t[f"grad_norm_{g}"] > 0
        assert t["grad_norm_attn_sem"] <= t["grad_norm_attn"] <= t["grad_norm_total"] + 1e-6
        assert t["data_ms"] >= 0 and t["host_rss_mb"] > 0
    assert "analysis @ 12:" in instrumented["stdout"]


@pytest.mark.slow
def test_analysis_h5_row_stochastic(instrumented):
    with h5py.File(instrumented["out"] / "analysis.h5", "r") as f:
        assert sorted(f) == [f"step_{s:08d}" for s in (0, 4, 8, 12)]
        g = f["step_00000012"]
        assert list(g.attrs["layers"]) == [0, 1] and list(g.attrs["heads"]) == [0, 1, 2]
        attn, null = g["attn"][:], g["attn_null"][:]
        assert attn.shape == (2, 3, 24, 24) and null.shape == (2, 3, 24)
        assert np.all(attn >= 0) and np.allclose(np.triu(attn, 1), 0)
        np.testing.assert_allclose(attn.sum(-1) + null, 1.0, atol=1e-5)
        sv = g["svals"][:]
        np.testing.assert_allclose(sv, np.linalg.svd(attn, compute_uv=False), rtol=1e-4, atol=1e-6)
        assert g["scores_sem"].shape == g["scores_geo"].shape == (2, 3, 24, 24)
        assert g.attrs["attn_entropy_mean"] == pytest.approx(g["metrics/attn_entropy"][:].mean(), rel=1e-5)


@pytest.mark.slow
def test_analysis_png_and_tensorboard(instrumented):
    import matplotlib.image as mpimg

    png = instrumented["out"] / "analysis.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    assert img.shape[0] > 400 and img.shape[1] > 800
    assert img[..., :3].std() > 0.05  # something is drawn
    tb_files = list((instrumented["out"] / "tb").glob("events.out.tfevents*"))
    assert tb_files and tb_files[0].stat().st_size > 500
    from tensorboardX.proto import event_pb2  # the file holds our scalars
    import struct

    tags = set()
    with open(tb_files[0], "rb") as f:
        while header := f.read(8):
            (n,) = struct.unpack("Q", header)
            f.read(4)
            ev = event_pb2.Event.FromString(f.read(n))
            f.read(4)
            tags |= {v.tag for v in ev.summary.value}
    assert {"train/loss", "eval/val_loss", "analysis/attn_entropy_mean", "train/grad_norm_attn_sem"} <= tags


@pytest.mark.slow
def test_tb_missing_is_one_line(tmp_path, instrumented, monkeypatch):
    code = ("import sys; sys.modules['tensorboardX'] = None; from cli.main import main; "
            f"sys.exit(main(['train', '--data', {str(instrumented['data'])!r}, '--vocab-size', '97', '--steps', '1', "
            f"'--tb', '--out-dir', {str(tmp_path / 'x')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tensorboardX" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "train.jsonl").exists()


@pytest.mark.slow
def test_analysis_h5_survives_sigkill(instrumented, tmp_path):
    """Kill the run at several moments; analysis.h5 always opens and holds every group whose
    analysis event reached train.jsonl, each complete."""
    for delay_events in (1, 3):
        out = tmp_path / f"k{delay_events}"
        p = subprocess.Popen([sys.executable, "-m", "cli", "train", "--data", str(instrumented["data"]),
                              "--vocab-size", "97", *TOY, "--steps", "400", "--eval-every", "0", "--log-every", "1",
                              "--batch-size", "2", "--train-seq-len", "32", "--instrument", "medium",
                              "--analysis-every", "1", "--analysis-max-tokens", "32", "--live", "basic",
                              "--out-dir", str(out)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        seen = 0
        deadline = time.time() + 240
        for line in p.stdout:
            seen += line.startswith("analysis @")
            if seen >= delay_events + 1 or time.time() > deadline:
                time.sleep(0.05 * delay_events)
                break
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        p.stdout.close()
        logged = [a["step"] for a in read_events(out / "train.jsonl", "analysis")]
        assert logged, "the run logged no analysis before the kill"
        with h5py.File(out / "analysis.h5", "r") as f:
            stored = sorted(int(f[k].attrs["step"]) for k in f)
            assert set(logged) <= set(stored)
            for k in f:
                attn = f[k]["attn"][:]
                np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)


# -- the dashboard -------------------------------------------------------------------------------
@pytest.mark.slow
def test_dashboard_renders_everything(instrumented):
    from rich.console import Console

    from train.dashboard import Dashboard

    buf = io.StringIO()
    d = Dashboard("rich", 12, 0, console=Console(file=buf, force_terminal=True, width=220, height=60))
    events = read_events(instrumented["out"] / "train.jsonl")
    for e in events:
        if e["event"] == "train":
            d.train(e)
        elif e["event"] == "eval":
            d.set_timing(eval_s=e["eval_s"])
            d.eval(e)
        elif e["event"] == "analysis":
            d.analysis(e)
    d.advance(12)
    d.close()
    text = buf.getvalue()
    last = [e for e in events if e["event"] == "train"][-1]
    for needle in ("host RSS", "train step", "data / step", "analysis @ 12", "val loss", "|g| attn_sem",
                   f"{last['loss']:.4f}", "erank"):
        assert needle in text, needle


# -- dba report -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_two_runs_kv_equals_kv_bytes(instrumented):
    from dba.config import ModelConfig
    from dba.kvspec import KVPolicy, human_bytes, kv_bytes

    std = instrumented["root"] / "std"
    ok(dba_train("--data", instrumented["data"], "--vocab-size", 97, "--attn-mode", "standard", "--d-model", 48,
                 "--layers", 2, "--n-head", 3, "--d-ff", 96, "--steps", 4, "--eval-every", 2, "--eval-iters", 2,
                 "--batch-size", 4, "--train-seq-len", 32, "--live", "off", "--out-dir", std))
    runs = [instrumented["out"], std]
    r = subprocess.run([sys.executable, "-m", "cli", "report", *map(str, runs), "--json"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [x["attn_mode"] for x in rep["runs"]] == ["decoupled", "standard"]
    for row, run in zip(rep["runs"], runs):
        meta = read_events(Path(run) / "train.jsonl", "meta")[0]
        cfg = ModelConfig.from_dict(meta["config"])
        assert row["kv_bytes_ctx"] == kv_bytes(cfg, 32, 1, KVPolicy())["total_bytes"]
        assert row["kv_bytes_128k"] == kv_bytes(cfg, 128_000, 1, KVPolicy())["total_bytes"]
        assert row["params"] == cfg.num_params()
        best = min(e["val_loss"] for e in read_events(Path(run) / "train.jsonl", "eval"))
        assert row["best_val_loss"] == pytest.approx(best)
    md = subprocess.run([sys.executable, "-m", "cli", "report", *map(str, runs), "--plot",
                         str(instrumented["root"] / "conv.png")], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=120)
    assert md.returncode == 0, md.stderr
    for row in rep["runs"]:
        assert f"| {row['run']} | {row['attn_mode']} |" in md.stdout
        assert human_bytes(row["kv_bytes_ctx"]) in md.stdout and human_bytes(row["kv_bytes_128k"]) in md.stdout
    assert "Variants" not in md.stdout  # two different models: no seed groups
    assert (instrumented["root"] / "conv.png").read_bytes()[:4] == b"\x89PNG"
    assert (std / "analysis.png").exists()


@pytest.mark.slow
def test_report_seed_variants_mean_std(instrumented, tmp_path):
    from dba.report import load_run, markdown, summarize, variants

    twin = tmp_path / "dec_seed2"
    twin.mkdir()
    events = read_events(instrumented["out"] / "train.jsonl")
    for e in events:
        if e["event"] == "meta":
            e["flags"]["seed"] = 2
        if e["event"] == "eval":
            e["val_loss"] += 0.5
    (twin / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    rows = [summarize(load_run(d)) for d in (instrumented["out"], twin)]
    groups = variants(rows)
    assert len(groups) == 1 and groups[0]["n"] == 2
    a, b = rows[0]["best_val_loss"], rows[1]["best_val_loss"]
    assert b == pytest.approx(a + 0.5)
    assert groups[0]["best_val_loss_mean"] == pytest.approx((a + b) / 2)
    assert groups[0]["best_val_loss_std"] == pytest.approx(np.std([a, b], ddof=1))
    assert "± " in markdown(rows, groups)


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [(["/nonexistent/run"], "does not exist"),
                                         (["."], "has no train.jsonl")])
def test_report_bad_input_one_line(args, needle):
    r = subprocess.run([sys.executable, "-m", "cli", "report", *args], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("flags,needle", [(["--instrument", "basic", "--analysis-layers", "9"], "out of range"),
                                          (["--instrument", "basic", "--analysis-topk", "0"], "must be >= 1")])
def test_bad_analysis_flags_one_line(instrumented, tmp_path, flags, needle):
    r = dba_train("--data", instrumented["data"], "--vocab-size", 97, *TOY, "--steps", 1, *flags,
                  "--out-dir", tmp_path / "bad")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
