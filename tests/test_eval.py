"""`dba eval`: the policy syntax, the task construction, the scores against an fp32 cache in both
frameworks (and the fp32 cache against the full forward), and the command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.parity_cases import build_jax, build_torch, init_like_state, make_config
from dba.errors import UserError
from dba.evaluation import EvalPlan, parse_contexts, passkey_sequences, ppl_windows
from dba.kvspec import KVPolicy, kv_bytes, parse_policy
from tests.support import tiered

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def test_policy_syntax():
    assert parse_policy("q4_0") == KVPolicy(kind="q4_0") == parse_policy("hetero")
    assert parse_policy("all=q4_0") == KVPolicy(kind="q4_0", k_geo="q4_0")
    p = parse_policy("k_sem=q4_0+rot, k_geo=q8_0 ,v=q4_0,residual=64,qblock=16,qblock_v=8")
    assert p == KVPolicy(k_sem="q4_0", k_geo="q8_0", v="q4_0", residual=64, qblock=16, qblock_v=8, rotate=("k_sem",))
    assert KVPolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    for bad, needle in (("q3_k", "q3_k"), ("v=q4_0+rot", "+rot"), ("depth=3", "depth"), ("residual=x", "x"),
                        ("", "empty"), ("k_sem=q4_0+rotate", "+rot")):
        with pytest.raises(UserError) as e:
            parse_policy(bad)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_policy_lists():
    from cli.eval import parse_policies

    assert list(parse_policies("fp16,q8_0,q4_0")) == ["fp16", "q8_0", "q4_0"]
    both = parse_policies("fp16; k_sem=q4_0,k_geo=q8_0,v=q4_0")
    assert list(both) == ["fp16", "k_sem=q4_0,k_geo=q8_0,v=q4_0"] and both["fp16"] == KVPolicy()


def test_windows_and_passkey_sequences():
    ids = np.arange(1000)  # every id once: a window is known by its first id
    w = ppl_windows(ids, 64, 5)
    assert w.shape == (5, 65) and w[0, 0] == 0 and w[-1, -1] == ids[-1]
    for row in w:  # each window is a contiguous slice of the data
        np.testing.assert_array_equal(row, ids[row[0]:row[0] + 65])
    assert np.abs(np.diff(w[:, 0]) - (1000 - 65) / 4).max() <= 1  # at evenly spaced offsets
    tokens = np.arange(1000) % 97
    seq, n_prompt = passkey_sequences(tokens, 64, 0.5, 6, 3, seed=1)
    assert seq.shape == (3, 64) and n_prompt == 58
    for row in seq:
        key = row[-6:]
        at = int(round(0.5 * (64 - 12)))
        assert np.array_equal(row[at:at + 6], key) and set(key) <= set(tokens)
    with pytest.raises(UserError, match="fewer than one window"):
        ppl_windows(tokens[:30], 64, 2)
    assert parse_contexts("256, 1k") == (256, 1000)
    plan = EvalPlan(contexts=(32,), tasks=("ppl", "passkey", "extrapolate"), depths=(0.1, 0.9), trained_ctx=16)
    assert plan.units() == [("ppl", 32, None), ("passkey", 32, 0.1), ("passkey", 32, 0.9),
                            ("extrapolate", 32, None), ("extrapolate", 64, None)]
    with pytest.raises(UserError, match="needle"):
        EvalPlan(contexts=(32,), tasks=("needle",))


@pytest.fixture(scope="module")
def models():
    cfg = make_config("decoupled", ("null",))
    state = init_like_state(cfg, 5)
    return cfg, build_jax(cfg, state), build_torch(cfg, state)


def test_fp32_cache_decode_equals_the_full_forward(models):
    import jax

    from jax_model.evaluate import score_policy

    cfg, jm, _ = models
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 21))
    s = score_policy(jm, tokens, 6, KVPolicy(kind="fp32"))
    logp = np.asarray(jax.nn.log_softmax(np.asarray(jm(tokens[:, :-1])), axis=-1))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0][:, 6:]
    assert s["nll"].shape == (2, 14)
    assert np.abs(s["ref_nll"] - nll).max() <= 1e-5 and np.abs(s["nll"] - nll).max() <= 1e-5
    assert np.abs(s["kl"]).max() <= 1e-6 and s["agree"].all()


@pytest.mark.parametrize("policy", tiered(["fp16,residual=4", "q8_0,residual=4", "all=q4_0,residual=0", "nf4,residual=4"], 2))
def test_jax_and_torch_scores_agree(models, policy):
    """Bounds below the effect they guard (measured on this model, max over tokens): the policy
    moves the NLL by 6.7e-5 (fp16) to 3e-2 (q4_0) and the frameworks differ by <= 2e-6, so each
    framework's per-token NLL change from its own fp32 cache must match the other's within a
    tenth of that change (a scorer that ignored the policy, or returned 0, fails). The KL is a
    signal for the 4-bit kinds (1e-5 to 1e-4, frameworks within 4e-7): compared relative to it;
    for fp16/q8_0 it is at fp32 rounding noise (<= 6e-7 here) and only bounded as such."""
    from jax_model.evaluate import score_policy as score_jax
    from torch_ref.evaluate import score_policy as score_torch

    cfg, jm, tm = models
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (3, 25))
    a, b = score_jax(jm, tokens, 8, parse_policy(policy)), score_torch(tm, tokens, 8, parse_policy(policy))
    effect_j, effect_t = a["nll"] - a["ref_nll"], b["nll"] - b["ref_nll"]
    effect = np.abs(effect_j).max()
    assert effect > 2e-5  # the policy changes the NLL (fp16: 6.7e-5, 4-bit: 2e-2 to 3e-2)
    assert np.abs(effect_t).max() > 0.5 * effect  # torch's scorer applies the policy too
    assert np.abs(effect_j - effect_t).max() <= 0.1 * effect  # ... the same policy, token by token
    assert np.abs(a["ref_nll"] - b["ref_nll"]).max() <= 5e-6  # the fp32 references (measured <= 2e-6)
    assert np.abs(a["nll"] - b["nll"]).max() <= 5e-6
    kl_gap = np.abs(a["kl"] - b["kl"]).max()
    if "4" in policy.split(",")[0]:  # q4_0 / nf4: KL 1e-5..1e-4
        assert a["kl"].max() > 1e-5 and kl_gap <= 0.05 * a["kl"].max()
    else:  # fp16 / q8_0: both KLs are fp32 noise around 0
        assert max(np.abs(a["kl"]).max(), np.abs(b["kl"]).max(), kl_gap) <= 2e-6


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from dba.config import ModelConfig
    from dba.weights import param_shapes, save_safetensors

    d = tmp_path_factory.mktemp("eval")
    cfg = ModelConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, d_model=22, d_ff=38, embed_dim=22,
                      attn_mode="decoupled", sem_dim=6, geo_dim=8, attn_dim=14)
    rng = np.random.default_rng(0)
    state = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in param_shapes(cfg).items()}
    model = save_safetensors(d / "tiny.safetensors", cfg, state)
    np.save(d / "tokens.npy", (np.arange(3000) * 7 % 61).astype(np.uint16))
    return cfg, model, d / "tokens.npy", d


@pytest.mark.slow
def test_eval_command_end_to_end(tiny_run):
    cfg, model, data, d = tiny_run
    out, plot = d / "eval.json", d / "pareto.png"
    r = subprocess.run([sys.executable, "-m", "cli", "eval", "--ckpt", str(model), "--data", str(data), "--policies",
                        "fp16;all=q4_0,residual=4", "--contexts", "24", "--tasks",
                        "ppl,passkey,extrapolate", "--depths", "0.5", "--passkey-len", "3", "--windows", "2",
                        "--json", str(out), "--plot", str(plot)], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(out.read_text())["records"]
    assert len(recs) == 2 * (1 + 1 + 2)  # policies x (ppl at 24, passkey at 24, extrapolate 48/96)
    for rec in recs:
        assert set(rec) >= {"task", "policy", "ctx", "backend", "nll", "ppl", "delta_nll", "kl", "top1", "kv_bytes",
                            "tokens"}
        assert rec["kv_bytes"] == kv_bytes(cfg, rec["ctx"], 1, parse_policy(rec["policy"]))["total_bytes"]
        assert rec["backend"] == "jax" and np.isfinite(rec["nll"])
    assert {r_["ctx"] for r_ in recs if r_["task"] == "extrapolate"} == {48, 96}
    pk = [r_ for r_ in recs if r_["task"] == "passkey"]
    assert all(r_["tokens"] == 4 * 2 and 0 <= r_["accuracy"] <= 1 for r_ in pk)  # 4 trials x (3 - 1) tokens
    assert plot.stat().st_size > 1000 and "ppl" in r.stdout and "Cache quality" in r.stdout
    assert [r_["tokens"] for r_ in recs if r_["task"] == "ppl"][:1] == [2 * 12]  # 2 windows x ctx/2


@pytest.mark.slow
def test_eval_torch_backend_matches_jax(tiny_run):
    cfg, model, data, d = tiny_run
    procs = {backend: subprocess.Popen([sys.executable, "-m", "cli", "eval", "--ckpt", str(model), "--data", str(data),
                                        "--backend", backend, "--policies", "q4_0,residual=4", "--contexts", "24",
                                        "--json", str(d / f"{backend}.json")], cwd=REPO, env=ENV,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for backend in ("jax", "torch")}  # side by side: most of each is the interpreter starting
    outs = {}
    for backend, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs[backend] = json.loads((d / f"{backend}.json").read_text())["records"][0]
    assert abs(outs["jax"]["nll"] - outs["torch"]["nll"]) <= 1e-3
    assert outs["torch"]["backend"] == "torch"


# ---- --teacher: the policy's predictions against another model's fp16-cache predictions ------

@pytest.mark.slow  # ~5 s: full forwards and both frameworks' scans
def test_teacher_scores_by_hand_and_across_frameworks(models):
    """The teacher decodes the same tokens from its own fp16 cache: with the model itself as the
    teacher and an fp16 policy every teacher field is the identity (0 KL, top-1 1); with another
    teacher they are its NLL and KL(teacher || policy) token by token (computed here from the two
    full forwards), the same in JAX and torch."""
    import jax

    from jax_model.evaluate import score_policy as score_jax
    from torch_ref.evaluate import score_policy as score_torch

    cfg, jm, tm = models
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 23))
    twin = build_jax(cfg, init_like_state(cfg, 5))  # the fixture's weights, another object
    same = score_jax(jm, tokens, 7, KVPolicy(kind="fp16"), teacher=twin)
    assert np.abs(same["nll"] - same["teacher_nll"]).max() <= 1e-6 and np.abs(same["kl_teacher"]).max() <= 1e-6
    assert same["agree_teacher"].all()
    other_state = init_like_state(cfg, 6)
    tj, tt = build_jax(cfg, other_state), build_torch(cfg, other_state)
    a = score_jax(jm, tokens, 7, parse_policy("q4_0,residual=2"), teacher=tj)
    b = score_torch(tm, tokens, 7, parse_policy("q4_0,residual=2"), teacher=tt)
    lt = np.asarray(jax.nn.log_softmax(np.asarray(tj(tokens[:, :-1])).astype(np.float64), axis=-1))[:, 7:]
    nll_t = -np.take_along_axis(lt, tokens[:, 8:, None], axis=-1)[..., 0]
    assert np.abs(a["teacher_nll"] - nll_t).max() <= 5e-4  # fp16 cache vs fp32 forward
    assert a["kl_teacher"].mean() > 1e-3  # two different models
    for k in ("teacher_nll", "kl_teacher", "nll"):
        assert np.abs(a[k] - b[k]).max() <= 1e-4, k
    assert (a["agree_teacher"] == b["agree_teacher"]).mean() > 0.95


def test_teacher_fields_in_records_and_the_plot(tmp_path):
    from dba.evaluation import TEACHER_FIELDS, summarize
    from dba.plots import plot_pareto

    scores = {"nll": np.array([[2.0, 3.0]]), "ref_nll": np.array([[2.0, 2.9]]), "kl": np.array([[0.0, 0.1]]),
              "agree": np.array([[True, False]]), "correct": np.array([[True, True]]),
              "ref_correct": np.array([[True, False]]), "teacher_nll": np.array([[1.5, 2.5]]),
              "kl_teacher": np.array([[0.2, 0.4]]), "agree_teacher": np.array([[True, True]]),
              "teacher_correct": np.array([[False, True]])}
    rec = summarize("passkey", "q4_0", 64, "jax", scores, 1000, 0.5, teacher_kv=4000)
    assert set(TEACHER_FIELDS) <= set(rec)
    assert rec["delta_nll_teacher"] == pytest.approx(0.5) and rec["kl_teacher"] == pytest.approx(0.3)
    assert rec["top1_teacher"] == 1.0 and rec["accuracy_teacher"] == 0.5 and rec["teacher_kv_bytes"] == 4000
    ppl = summarize("ppl", "q4_0", 64, "jax", scores, 1000, teacher_kv=4000)
    out = plot_pareto([ppl], tmp_path / "p.png", teacher="t.safetensors")
    assert out.stat().st_size > 1000


def test_teacher_with_another_vocabulary_is_one_line(tiny_run, tmp_path, capsys):
    from cli.main import main
    from dba.weights import param_shapes, save_safetensors

    cfg, model, data, _ = tiny_run
    other = cfg.replace(vocab_size=70)
    rng = np.random.default_rng(1)
    save_safetensors(tmp_path / "t.safetensors", other,
                     {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in param_shapes(other).items()})
    assert main(["eval", "--ckpt", str(model), "--data", str(data), "--teacher", str(tmp_path / "t.safetensors"),
                 "--contexts", "24"]) == 2
    err = capsys.readouterr().err.strip()
    assert "its vocabulary is 70 ids, the model's 61" in err and "\n" not in err
