"""dba upcycle: a standard/GQA teacher rewritten as decoupled attention (dba/upcycle.py).

The maps are checked where their answer is known: at full rank (every semantic and value dim
kept) the student computes the teacher's function; the geometric rows are the teacher's own, at
its frequencies; the pair choice follows its criterion. Then the command end to end and every bad
input as one line with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.parity_cases import build_jax, build_torch, random_state, random_tokens
from dba.config import ModelConfig
from dba.errors import UserError
from dba.upcycle import StudentPlan, select_pairs, student_config, teacher_freqs, upcycle

# 6 query heads over 2 kv heads, head dim 12 (6 RoPE pairs), value head 12. rope_base 1e16 makes
# pairs 3..5 rotate by <= 1e-8 rad per token: keeping pairs 0..2 exactly and the rest unrotated
# at full rank is then the teacher's function to float32 rounding.
TEACHER = ModelConfig(vocab_size=101, block_size=96, n_layer=2, n_head=6, d_model=60, d_ff=74, embed_dim=60,
                      attn_mode="gqa", attn_dim=72, kv_head=2, rope_base=1e16, null_attn=True, qkv_bias=True,
                      out_bias=True, norm="rmsnorm")


def _full_rank(kv_head):
    n = 2 // (kv_head or 2)  # teacher kv heads per student kv head
    return StudentPlan(sem_dim=6 * (12 * n - 6 * n), geo_dim=6 * 6 * n, attn_dim=6 * 12 * n, kv_head=kv_head,
                       rope_select="high")


def _moments(seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(TEACHER.n_layer):
        a = rng.normal(size=(61, 61))
        out.append(a @ a.T / 61 + np.eye(61) * 0.1)
    return out


@pytest.mark.parametrize("kv_head", [None, 1], ids=["keep-groups", "merge-groups"])
@pytest.mark.parametrize("weighted", [False, True], ids=["weights", "calibrated"])
def test_full_rank_student_is_the_teacher(kv_head, weighted):
    state = random_state(TEACHER, 3)
    s_cfg, s_state = upcycle(TEACHER, state, _full_rank(kv_head), _moments() if weighted else None, smaller=False)
    assert s_cfg.attn_mode == "decoupled" and s_cfg.n_kv_head == (kv_head or 2)
    tokens = random_tokens(TEACHER, 2, 80)
    want = np.asarray(build_jax(TEACHER, state)(tokens))
    assert np.abs(want).max() > 1.0
    assert np.abs(np.asarray(build_jax(s_cfg, s_state)(tokens)) - want).max() <= 2e-5
    assert np.abs(build_torch(s_cfg, s_state)(tokens).detach().numpy() - want).max() <= 2e-5


def test_geometric_rows_are_the_teachers_at_its_frequencies():
    cfg = TEACHER.replace(rope_base=10000.0)
    state = random_state(cfg, 4)
    plan = StudentPlan(sem_dim=12, geo_dim=24, attn_dim=36, rope_select="2norm")
    s_cfg, s_state = upcycle(cfg, state, plan)
    freqs = teacher_freqs(cfg)
    wk = state["blocks.1.attn.k_proj.weight"].reshape(2, 12, 60)
    kg = s_state["blocks.1.attn.k_geo.weight"].reshape(2, 4, 60)  # 2 pairs per kv head
    for g in range(2):
        for j, f in enumerate(s_cfg.rope_freqs[1][g]):
            i = int(np.flatnonzero(freqs == np.float32(f))[0])
            np.testing.assert_array_equal(kg[g, j], wk[g, i])
            np.testing.assert_array_equal(kg[g, j + 2], wk[g, i + 6])
    # the query rows are the teacher's, scaled by sqrt(geo_hd / head dim) (the student's per-path
    # 1/sqrt(geo_hd) then gives the teacher's 1/sqrt(head dim))
    wq = state["blocks.1.attn.q_proj.weight"].reshape(6, 12, 60)
    qg = s_state["blocks.1.attn.q_geo.weight"].reshape(6, 4, 60)
    i = int(np.flatnonzero(freqs == np.float32(s_cfg.rope_freqs[1][0][0]))[0])
    np.testing.assert_allclose(qg[0, 0], wq[0, i] * np.sqrt(4 / 12), rtol=1e-6)


def test_pair_selection_follows_its_criterion():
    freqs = np.float32([1.0, 0.1, 0.01, 0.001])
    contrib = np.array([[0.1, 5.0, 0.2, 3.0], [4.0, 0.3, 0.1, 0.2]])  # 2 teacher heads x 4 pairs
    assert select_pairs(contrib, freqs, 3, "2norm") == [(1, 0), (0, 1), (0, 3)]  # ordered by frequency
    assert select_pairs(contrib, freqs, 3, "high") == [(0, 0), (1, 0), (0, 1)]
    # evenly spaced over the 8 candidates ordered by frequency: positions 0, 4 (3.5 rounded to even), 7
    assert select_pairs(contrib, freqs, 3, "uniform") == [(0, 0), (0, 2), (1, 3)]


def test_calibration_moments_agree_across_frameworks_and_with_numpy():
    from jax_model.calibrate import attention_input_moments as jax_moments
    from torch_ref.calibrate import attention_input_moments as torch_moments

    state = random_state(TEACHER, 5)
    tokens = random_tokens(TEACHER, 3, 64)
    mj = jax_moments(build_jax(TEACHER, state), tokens, batch=2)
    mt = torch_moments(build_torch(TEACHER, state), tokens, batch=2)
    assert mj.shape == (2, 61, 61) and np.abs(mj - mt).max() <= 1e-5 * np.abs(mt).max()
    # layer 0's input is the RMSNorm of the embedding: computed here by hand
    emb = state["tok_emb.weight"][tokens].reshape(-1, 60).astype(np.float64)
    x = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + TEACHER.norm_eps) * state["blocks.0.ln1.weight"]
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    np.testing.assert_allclose(mt[0], x.T @ x / len(x), rtol=1e-5, atol=1e-6)


# ---- the command --------------------------------------------------------------------------

BYTE_TEACHER = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=32, d_ff=64, embed_dim=32,
                           attn_mode="gqa", attn_dim=32, kv_head=2)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from dba.weights import save_safetensors

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_safetensors(path, BYTE_TEACHER, random_state(BYTE_TEACHER, 9))
    return path


def _upcycle(*argv) -> int:
    from cli.main import main

    return main(["upcycle", *map(str, argv)])


def test_upcycle_command_writes_a_smaller_student_and_scores_it(teacher_file, tmp_path, capsys):
    from dba.weights import load_safetensors

    out, report = tmp_path / "student.safetensors", tmp_path / "r.json"
    assert _upcycle(teacher_file, out, "--budget", "1/4", "--calib-tokens", 512, "--calib-len", 64,
                    "--json", report) == 0
    cfg, state, meta = load_safetensors(out)
    assert cfg.attn_mode == "decoupled" and cfg.n_kv_head == 2 and len(cfg.rope_freqs) == 2
    r = json.loads(report.read_text())
    assert r["teacher_kv_bytes_per_token"] == 2 * 2 * (8 + 8) * 2  # layers x kv heads x (k + v head dims) x fp16
    assert r["x_smaller"] == pytest.approx(4.0) and r["calib_tokens"] == 512
    assert 0 < r["kl"] and 0 <= r["top1_agree"] <= 1 and r["delta_nll"] == pytest.approx(
        r["student_nll"] - r["teacher_nll"])
    assert json.loads(meta["upcycle"])["calibration"]["tokens"] == 512
    assert "training-free" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--sem-dim", 6, "--geo-dim", 8, "--attn-dim", 8], "--sem-dim 6 is not divisible by the teacher's 4 heads"),
    (["--sem-dim", 4, "--geo-dim", 40, "--attn-dim", 8], "keeps 5 RoPE pairs per kv head, but the teacher's head has only 4"),
    (["--sem-dim", 4, "--geo-dim", 8, "--attn-dim", 8, "--kv-head", 3], "--kv-head 3: must divide the teacher's 2"),
    (["--sem-dim", 8, "--geo-dim", 24, "--attn-dim", 32], "would not be smaller than the teacher's"),
    (["--sem-dim", 4, "--geo-dim", 8, "--attn-dim", 64], "value heads of 16 dims, more than the teacher's 8"),
    (["--budget", "1/4", "--sem-dim", 4], "--budget chooses the dims"),
    (["--sem-dim", 4], "give the student's --sem-dim, --geo-dim and --attn-dim, or --budget"),
])
def test_bad_plans_are_one_line_and_write_nothing(teacher_file, tmp_path, capsys, argv, needle):
    out = tmp_path / "s.safetensors"
    assert _upcycle(teacher_file, out, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_teachers_and_data_are_one_line(teacher_file, tmp_path, capsys):
    from dba.weights import save_safetensors

    decoupled = tmp_path / "dec.safetensors"
    cfg = BYTE_TEACHER.replace(attn_mode="decoupled", kv_head=None, sem_dim=8, geo_dim=16)
    save_safetensors(decoupled, cfg, random_state(cfg, 1))
    out = tmp_path / "s.safetensors"
    assert _upcycle(decoupled, out, "--budget", "1/4") == 2
    assert "the teacher's attention is 'decoupled'" in capsys.readouterr().err
    # calibration ids outside the teacher's 256-id vocabulary
    data = tmp_path / "ids.npy"
    np.save(data, np.arange(1000, dtype=np.uint16) % 300)
    assert _upcycle(teacher_file, out, "--budget", "1/4", "--calib", data) == 2
    assert "has token id 299, outside the teacher's vocabulary of 256 ids" in capsys.readouterr().err
    out.write_text("keep me")
    assert _upcycle(teacher_file, out, "--budget", "1/4") == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec.safetensors", "ids.npy", "s.safetensors"]


def test_student_config_refuses_a_teacher_without_rope():
    with pytest.raises(UserError, match="the teacher has no RoPE"):
        student_config(BYTE_TEACHER.replace(rope=False), StudentPlan(4, 8, 8))


def test_scores_against_the_teacher_agree_across_frameworks_and_by_hand():
    from jax_model.evaluate import score_against as jax_scores
    from torch_ref.evaluate import score_against as torch_scores

    state = random_state(TEACHER, 6)
    s_cfg, s_state = upcycle(TEACHER.replace(rope_base=10000.0), state, StudentPlan(12, 24, 36))
    tokens = random_tokens(TEACHER, 3, 65)
    sj = jax_scores(build_jax(s_cfg, s_state), build_jax(TEACHER, state), tokens, batch=2)
    st = torch_scores(build_torch(s_cfg, s_state), build_torch(TEACHER, state), tokens, batch=2)
    for k in ("nll", "ref_nll", "kl"):
        assert sj[k].shape == (3, 64) and np.abs(sj[k] - st[k]).max() <= 1e-4
    assert (sj["agree"] == st["agree"]).mean() > 0.99
    # by hand, from the two models' logits
    lt = build_torch(TEACHER, state)(tokens[:, :-1]).detach().double().numpy()
    ls = build_torch(s_cfg, s_state)(tokens[:, :-1]).detach().double().numpy()
    lpt = lt - np.log(np.exp(lt - lt.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lt.max(-1, keepdims=True)
    lps = ls - np.log(np.exp(ls - ls.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ls.max(-1, keepdims=True)
    kl = (np.exp(lpt) * (lpt - lps)).sum(-1)
    assert np.abs(kl - st["kl"]).max() <= 1e-5 and kl.mean() > 1e-3
    nll_t = -np.take_along_axis(lpt, tokens[:, 1:, None], -1)[..., 0]
    assert np.abs(nll_t - st["ref_nll"]).max() <= 1e-5
