"""The self-optimizing cache policy (dba/self_opt.py): candidates under a budget, quality first
then speed then memory, the plan cache, online switching with hysteresis, and `--self-opt` through
`dba sample` and `dba eval` in both backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dba.config import ModelConfig
from dba.errors import UserError
from dba.kvspec import KVPolicy, kv_bytes
from dba.self_opt import OnlinePlanner, SelfOptOptions, candidates, choose, load_plan, plan_key, save_plan

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
CFG = ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, embed_dim=32,
                  attn_mode="decoupled", sem_dim=8, geo_dim=16, attn_dim=32)
SMALL = dict(k_sem_kinds=("q4_0", "fp16"), k_geo_kinds=("q8_0", "q4_0", "fp16"), v_kinds=("q4_0", "fp16"),
             residuals=(0, 16), qblocks=(8, 16))
BITS = {"fp16": 16, "q8_0": 8, "q4_0": 4, "nf4": 4}


def fake_score(error_per_4bit: float):
    """Scores whose delta_nll grows with the number of 4-bit streams (8-bit: a tenth of it)."""
    def score(tokens, n_prompt, policy):
        kinds = [policy.resolve(s, CFG.attn_mode)[0] for s in CFG.kv_streams()]
        err = sum(error_per_4bit if k in ("q4_0", "nf4") else error_per_4bit / 10 if k == "q8_0" else 0.0
                  for k in kinds)
        shape = (1, 4)
        return {"nll": np.full(shape, 1.0 + err), "ref_nll": np.ones(shape), "kl": np.full(shape, err / 2)}
    return score


def fake_time(policy, ctx, n, block):
    """Bytes read per step, plus a dequantization cost per 4-bit stream, plus a block penalty."""
    kinds = [policy.resolve(s, CFG.attn_mode)[0] for s in CFG.kv_streams()]
    return kv_bytes(CFG, ctx, 1, policy)["total_bytes"] * 1e-9 + 1e-5 * sum(k == "q4_0" for k in kinds) + block * 1e-9


def test_candidates_fit_the_budget_fewest_bytes_first():
    o = SelfOptOptions(mem_budget_mb=0.02, **SMALL)
    pool = candidates(CFG, 256, o)
    assert pool and all(c.bytes <= o.budget_bytes for c in pool)
    assert [c.bytes for c in pool] == sorted(c.bytes for c in pool)
    everything = candidates(CFG, 256, SelfOptOptions(**SMALL))
    assert len(everything) > len(pool) and len({c.label for c in everything}) == len(everything)
    std = candidates(CFG.replace(attn_mode="standard"), 256, SelfOptOptions(**SMALL))
    assert all("k=" in c.label and "k_sem" not in c.label for c in std)


def test_quality_first_then_speed_then_memory():
    calib = np.zeros((1, 12), np.int64)
    o = SelfOptOptions(mode="startup", scope="cache", quality_delta_nll_tol=0.05, calib_prefill=4, calib_decode=4, **SMALL)
    d = choose(CFG, 256, calib, fake_score(0.03), fake_time, o, KVPolicy())
    kinds = [d.policy.resolve(s, "decoupled")[0] for s in CFG.kv_streams()]
    assert sum(k in ("q4_0", "nf4") for k in kinds) <= 1  # two 4-bit streams (0.06) fail the guard
    assert all(c.passed is not None for c in d.tried) and d.delta_nll <= 0.05
    passing = [c for c in d.tried if c.passed]
    fastest = min(c.step_s for c in passing)
    assert 1.0 / d.tok_s <= fastest * (1 + o.prefer_low_mem_within)
    # decode blocks: scope all also times each block and keeps the fastest (the smallest here)
    d2 = choose(CFG, 256, calib, fake_score(0.03), fake_time, SelfOptOptions(**{**o.__dict__, "scope": "all"}), KVPolicy())
    assert d2.decode_block == 256 and d2.label == d.label


def test_screening_drops_a_kind_that_fails_alone():
    """A kind whose error on one stream alone already breaks the guard (here nf4/q4_0 on k_sem) is
    probed once, alone, at its most accurate settings; no candidate holding it on that stream is
    then scored jointly, and the winner does not hold it."""
    calls = []

    def score(tokens, n_prompt, policy):
        calls.append(policy)
        kinds = {st: policy.resolve(st, CFG.attn_mode)[0] for st in CFG.kv_streams()}
        err = (0.5 if kinds["k_sem"] in ("q4_0", "nf4") else 0.0) + sum(
            0.001 for st, k in kinds.items() if st != "k_sem" and k in ("q4_0", "nf4", "q8_0"))
        return {"nll": np.full((1, 4), 1.0 + err), "ref_nll": np.ones((1, 4)), "kl": np.full((1, 4), err)}

    o = SelfOptOptions(mode="startup", scope="cache", quality_delta_nll_tol=0.05, calib_prefill=4, calib_decode=4,
                       k_sem_kinds=("q4_0", "nf4", "q8_0", "fp16"), **{k: v for k, v in SMALL.items() if k != "k_sem_kinds"})
    d = choose(CFG, 256, np.zeros((1, 12), np.int64), score, fake_time, o, KVPolicy())
    probes = [p for p in calls if p.kind == "fp16" and sum(getattr(p, st) is not None for st in ("k_sem", "k_geo", "v")) == 1]
    probed = {(st, getattr(p, st)) for p in probes for st in ("k_sem", "k_geo", "v") if getattr(p, st) is not None}
    assert {("k_sem", "q4_0"), ("k_sem", "nf4"), ("k_sem", "q8_0"), ("v", "q4_0")} <= probed
    assert all(p.residual == max(o.residuals) and p.qblock == min(o.qblocks) for p in probes)
    joint = calls[len(probes):]
    assert joint and not any(p.resolve("k_sem", "decoupled")[0] in ("q4_0", "nf4") for p in joint)
    assert d.policy.resolve("k_sem", "decoupled")[0] in ("q8_0", "fp16") and d.delta_nll <= 0.05
    everything = candidates(CFG, 256, o)
    assert any(c.policy.resolve("k_sem", "decoupled")[0] == "q4_0" for c in everything)  # there was one to drop


def test_within_the_speed_margin_the_smaller_cache_wins():
    """Quality, then speed, then memory: among passing candidates timed within
    --self-opt-prefer-low-mem-within of the fastest, the one with the fewest bytes wins; with a
    margin of 0 the fastest wins."""
    def score(tokens, n_prompt, policy):  # everything passes
        return {"nll": np.ones((1, 4)), "ref_nll": np.ones((1, 4)), "kl": np.zeros((1, 4))}

    def bigger_is_faster(policy, ctx, n, block):  # 1% spread over the pool: the biggest cache is fastest
        return 1.0 - 1e-2 * kv_bytes(CFG, ctx, 1, policy)["total_bytes"] / kv_bytes(CFG, ctx, 1, KVPolicy())["total_bytes"]

    base = dict(mode="startup", scope="cache", calib_prefill=4, calib_decode=4, **SMALL)
    calib = np.zeros((1, 12), np.int64)
    roomy = choose(CFG, 256, calib, score, bigger_is_faster, SelfOptOptions(prefer_low_mem_within=0.02, **base), KVPolicy())
    strict = choose(CFG, 256, calib, score, bigger_is_faster, SelfOptOptions(prefer_low_mem_within=0.0, **base), KVPolicy())
    timed = [c for c in roomy.tried if c.step_s is not None]
    assert len(timed) >= 2
    assert roomy.bytes == min(c.bytes for c in timed)  # all within 2%: the smallest cache
    assert strict.bytes == max(c.bytes for c in timed)  # no margin: the fastest, here the biggest
    assert strict.bytes > roomy.bytes


def test_nothing_fits_or_passes_is_one_line_or_falls_back(capsys):
    calib = np.zeros((1, 12), np.int64)
    tiny = SelfOptOptions(mode="startup", mem_budget_mb=1e-6, calib_prefill=4, calib_decode=4, **SMALL)
    with pytest.raises(UserError) as e:
        choose(CFG, 256, calib, fake_score(0.0), fake_time, tiny, KVPolicy())
    assert "no cache policy fits" in str(e.value) and "smallest candidate" in str(e.value) and e.value.code == 1
    strict = SelfOptOptions(mode="startup", quality_delta_nll_tol=-1.0, calib_prefill=4, calib_decode=4, **SMALL)
    with pytest.raises(UserError, match="quality guard.*the best"):
        choose(CFG, 256, calib, fake_score(0.03), fake_time, strict, KVPolicy())
    back = choose(CFG, 256, calib, fake_score(0.03), fake_time,
                  SelfOptOptions(**{**strict.__dict__, "fallback": True}), KVPolicy(kind="q8_0"))
    assert back.policy == KVPolicy(kind="q8_0") and "falling back" in capsys.readouterr().err


def test_plan_cache_round_trip(tmp_path):
    calib = np.zeros((1, 12), np.int64)
    o = SelfOptOptions(mode="startup", scope="cache", calib_prefill=4, calib_decode=4, **SMALL)
    d = choose(CFG, 128, calib, fake_score(0.001), fake_time, o, KVPolicy())
    key = plan_key(CFG, str(tmp_path / "none.safetensors"), 128, o)
    assert key != plan_key(CFG, str(tmp_path / "none.safetensors"), 256, o)
    save_plan(tmp_path / "plan.json", key, d)
    again = load_plan(tmp_path / "plan.json", key)
    assert again.from_cache and again.policy == d.policy and again.label == d.label and again.bytes == d.bytes
    assert load_plan(tmp_path / "plan.json", "other") is None
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(UserError, match="bad.json"):
        load_plan(tmp_path / "bad.json", key)


def test_online_planner_keeps_a_policy_that_still_fits(capsys):
    calib = np.zeros((1, 12), np.int64)
    o = SelfOptOptions(mode="online", scope="cache", calib_prefill=4, calib_decode=4, policy_hysteresis=10.0, **SMALL)
    said = []
    planner = OnlinePlanner(lambda ctx: choose(CFG, ctx, calib, fake_score(0.001), fake_time, o, KVPolicy()), o, CFG,
                            say=said.append)
    first = planner(32)
    assert planner(64) == first and planner(128) == first and planner.switches == 0 and len(said) == 1
    smallest = candidates(CFG, 256, o)[0].bytes
    between = (kv_bytes(CFG, 256, 1, first[0])["total_bytes"] + smallest) / 2
    assert smallest < between < kv_bytes(CFG, 256, 1, first[0])["total_bytes"]
    budget = SelfOptOptions(**{**o.__dict__, "mem_budget_mb": between / (1 - o.mem_overhead_frac) / 2**20})
    tight = OnlinePlanner(lambda ctx: choose(CFG, ctx, calib, fake_score(0.001), fake_time, budget, KVPolicy()), budget,
                          CFG, say=said.append)
    tight.current = planner.current
    switched = tight(256)[0]
    assert switched != first[0] and kv_bytes(CFG, 256, 1, switched)["total_bytes"] <= between  # over budget: switched


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dba.weights import param_shapes, save_safetensors

    d = tmp_path_factory.mktemp("selfopt")
    rng = np.random.default_rng(1)
    state = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in param_shapes(CFG).items()}
    model = save_safetensors(d / "m.safetensors", CFG, state)
    np.save(d / "tokens.npy", (np.arange(4000) * 5 % 64).astype(np.uint16))
    return model, d / "tokens.npy", d


FLAGS = ["--self-opt-k-sem-kinds", "q4_0,fp16", "--self-opt-k-geo-kinds", "q8_0,fp16", "--self-opt-v-kinds", "q4_0,fp16",
         "--self-opt-residuals", "0,8", "--self-opt-qblocks", "8", "--self-opt-decode-blocks", "16,64",
         "--self-opt-calib-prefill", "16", "--self-opt-calib-decode", "8", "--self-opt-iters", "1"]
# JAX compiles every candidate's decode again, so its run searches a smaller set (two candidates)
FEW = [*FLAGS[:2], "--self-opt-k-geo-kinds", "q8_0", "--self-opt-v-kinds", "q4_0", "--self-opt-residuals", "8",
       "--self-opt-qblocks", "8", "--self-opt-decode-blocks", "16", *FLAGS[-6:]]


@pytest.mark.slow
@pytest.mark.parametrize("backend,mode", [("jax", "startup"), ("torch", "startup"), ("torch", "online")])
def test_sample_with_self_opt(tiny, backend, mode):
    model, data, d = tiny
    plan = d / f"plan-{backend}.json"
    argv = [sys.executable, "-m", "cli", "sample", "--ckpt", str(model), "--backend", backend, "--prompt-tokens",
            "1,2,3", "--max-new-tokens", "40", "--self-opt", mode, "--self-opt-calib-tokens", str(data),
            "--self-opt-mem-budget-mb", "0.05", "--self-opt-interval", "8", "--self-opt-cache", str(plan),
            *(FEW if backend == "jax" else FLAGS)]
    r = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("self-opt")]
    assert lines and "delta_nll" in lines[0] and "tok/s" in lines[0]
    assert len(r.stdout.strip().split(",")) == 43
    if mode == "startup":
        assert json.loads(plan.read_text())  # saved, and reused next time
        again = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert "from the plan cache" in again.stderr and again.stdout == r.stdout


@pytest.mark.slow
def test_eval_adds_the_self_opt_choice(tiny):
    model, data, d = tiny
    out = d / "eval.json"
    r = subprocess.run([sys.executable, "-m", "cli", "eval", "--ckpt", str(model), "--data", str(data), "--split", "all",
                        "--backend", "torch", "--policies", "fp16", "--contexts", "32", "--windows", "2", "--self-opt", "startup",
                        "--self-opt-mem-budget-mb", "0.05", "--json", str(out), *FLAGS], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    labels = [rec["policy"] for rec in json.loads(out.read_text())["records"]]
    assert labels[0] == "fp16" and labels[1].startswith("self-opt: ")


@pytest.mark.parametrize("old,new", [("fp16", "all=q4_0,residual=4"), ("q8_0,residual=4", "all=nf4,residual=2"),
                                     ("k_sem=q4_0+rot,k_geo=q8_0+rot,residual=4", "fp32"),
                                     ("fp32", "k_sem=q4_0+rot,k_geo=q4_0+rot,v=q4_0,residual=4"),
                                     ("all=q4_0,residual=4", "all=q4_0,residual=4")])
def test_recache_keeps_the_tokens_and_matches_across_frameworks(old, new):
    """The same cache contents (written from the same numbers in both frameworks), stored again
    under another policy: identical bytes in JAX and torch; nothing changes where the policy does
    not; a rotated stream comes back un-rotated."""
    import jax.numpy as jnp
    import torch

    from dba.kvspec import parse_policy
    from jax_model import kvcache as jk
    from jax_model.recache import recache as jre
    from torch_ref import kvcache as tk
    from torch_ref.recache import recache as tre

    cfg = CFG.replace(n_head=2, sem_dim=8, geo_dim=16)
    rng = np.random.default_rng(7)
    values = {s: rng.normal(0, 1, (2, 10, w)).astype(np.float32) for s, w in cfg.kv_streams().items()}
    jc, tc = jk.init_cache(cfg, parse_policy(old), 2, 16), tk.init_cache(cfg, parse_policy(old), 2, 16)
    jc = jc.replace(layers=tuple({s: jk.write(st, jnp.asarray(values[s]), 0) for s, st in layer.items()}
                                 for layer in jc.layers), pos=jnp.int32(10))
    for layer in tc.layers:
        for s, st in layer.items():
            tk.write(st, torch.as_tensor(values[s]), 0)
    tc.pos = 10
    jn, tn = jre(cfg, jc, parse_policy(new), max_len=24), tre(cfg, tc, parse_policy(new), max_len=24)
    assert int(jn.pos) == tn.pos == 10 and jn.max_len == tn.max_len == 24
    for l in range(cfg.n_layer):
        for s in cfg.kv_streams():
            a, b = jn.layers[l][s], tn.layers[l][s]
            for x, y in ((a.data, b.data), (a.scale, b.scale), (a.ring, b.ring)):
                assert (x is None) == (y is None) and (x is None or np.array_equal(np.asarray(x)[:, :10], y.numpy()[:, :10]))
            if new == "fp32":  # exact storage: the old cache's values, un-rotated
                old_vals = np.asarray(jk.read(jc.layers[l][s], 0, 10, 10))
                n = jc.layers[l][s].rot_dim
                if n:
                    from jax_model.layers import hadamard

                    old_vals = np.asarray(hadamard(jnp.asarray(old_vals), n)) / n
                assert np.abs(np.asarray(jk.read(a, 0, 10, 10)) - old_vals).max() <= 1e-5
            if old == new:
                assert np.array_equal(np.asarray(a.data)[:, :10], np.asarray(jc.layers[l][s].data)[:, :10])
