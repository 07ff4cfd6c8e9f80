"""Upcycling (framework-free): a pretrained standard/GQA attention rewritten as decoupled attention
whose initial function is as close to the teacher's as the student's dims allow (`dba upcycle`).

Per layer, on the teacher's canonical weights (torch layout, [out, in]) and, when calibration
tokens were given, the second moment M = E[x x^T] of each attention input x (the ln1 output with
a trailing 1, so biases ride along as a last column; without calibration M = I, which weighs
every input direction alike and makes the maps below SVDs of the weights themselves):

- geometric part: the teacher rotates head-dim pair i (dims i and i + D/2, the half-split layout)
  at frequency w_i. Per student kv head, the p = geo_hd / 2 pairs kept are the ones whose score
  contribution sqrt(E|q_i|^2) * sqrt(E|k_i|^2), summed over the query heads that read them, is
  largest (`2norm`, MHA2MLA's criterion), or the highest frequencies (`high`), or frequencies
  evenly spaced over the teacher's range (`uniform`). Their rows are copied exactly and rotate at
  the teacher's own w_i (`ModelConfig.rope_freqs` records them), so this part of every score is
  the teacher's, bit for bit up to the scale folded into the query.
- semantic part: the remaining m dims of q and k (their rotation dropped) become a rank-r
  bilinear form, r = sem_hd. With Ck, Cq the key's and a query head's covariance on those dims,
  the error E[(q^T (I - N) k)^2] = |Cq^1/2 (I - N) Ck^1/2|_F^2 is minimised over a key map
  shared by the group's query heads by the top-r right singular vectors V of the stacked
  [Cq_h^1/2 E_h Ck^1/2] (E_h: query head h's block of the group's keys): k_sem = V^T Ck^-1/2 k,
  q_sem_h = V^T Ck^1/2 E_h^T q_h. At r = m it is exact.
- values: v (the group's teacher heads, concatenated) is cut to a = attn_dim / H dims as
  v' = V^T Cv^-1/2 v, and each query head's output projection is folded to Wo_h E_h Cv^1/2 V,
  V the top-a right singular vectors of the stacked [Wo_h E_h Cv^1/2]: the rank-a output map
  closest to the teacher's over the values the calibration saw. (A joint K/V factorisation, as
  MHA2MLA's, would save nothing here: k_sem and v are cached as separate streams.)
- a GQA teacher keeps its grouping: student kv head g holds teacher kv heads g*n .. g*n + n - 1
  (n = teacher kv heads / student kv heads, 1 by default), so its cache is smaller, never larger.
- everything else (embeddings, MLPs, norms, the head, null keys through the same maps, the
  learned temperature) is copied.

The score scale 1/sqrt(D) is folded into the student's query rows (its per-path scales are
1/sqrt(sem_hd) and 1/sqrt(geo_hd)), so at full rank the student computes the teacher's function
apart from the dropped rotation of the semantic dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dba.config import ModelConfig
from dba.errors import UserError
from dba.kvspec import kv_bytes
from dba.rope import default_inv_freq, inv_freq_table

ROPE_SELECT = ("2norm", "high", "uniform")
TEACHER_MODES = ("standard", "bottleneck", "gqa")


@dataclass(frozen=True)
class StudentPlan:
    """The student's shape: dims summed over its H query heads (as ModelConfig's), kv heads."""

    sem_dim: int
    geo_dim: int
    attn_dim: int
    kv_head: int | None = None  # None: the teacher's kv heads
    rope_select: str = "2norm"


def teacher_freqs(cfg: ModelConfig) -> np.ndarray:
    """The teacher's RoPE frequency per head-dim pair (D / 2 float32 values)."""
    table = inv_freq_table(cfg)
    return np.asarray(table, np.float32) if table is not None else default_inv_freq(cfg.rope_dim, cfg.rope_base)


def student_config(teacher: ModelConfig, plan: StudentPlan, rope_freqs=None, *, smaller: bool = True) -> ModelConfig:
    """The student's config; every impossible plan is a one-line UserError naming the value.
    `smaller=False` lifts the rule that the student's cache be smaller (full-rank checks)."""
    h = teacher.n_head
    if teacher.attn_mode not in TEACHER_MODES:
        raise UserError(f"the teacher's attention is {teacher.attn_mode!r}: upcycling starts from standard or gqa "
                        f"attention (a decoupled model is already decoupled)", 2)
    if not teacher.rope:
        raise UserError("the teacher has no RoPE: there are no rotated pairs to keep (upcycling needs a RoPE teacher)", 2)
    if plan.rope_select not in ROPE_SELECT:
        raise UserError(f"--rope-select {plan.rope_select!r}: choose {'|'.join(ROPE_SELECT)}", 2)
    for flag, v in (("--sem-dim", plan.sem_dim), ("--geo-dim", plan.geo_dim), ("--attn-dim", plan.attn_dim)):
        if not isinstance(v, int) or v <= 0:
            raise UserError(f"{flag} {v!r}: must be a positive integer", 2)
        if v % h:
            raise UserError(f"{flag} {v} is not divisible by the teacher's {h} heads", 2)
    t_kv = teacher.n_kv_head
    k = t_kv if plan.kv_head is None else plan.kv_head
    if not isinstance(k, int) or k <= 0 or t_kv % k:
        raise UserError(f"--kv-head {plan.kv_head!r}: must divide the teacher's {t_kv} kv heads", 2)
    n = t_kv // k  # teacher kv heads per student kv head
    d_head, dv_head = teacher.qk_dim // h, teacher.v_dim // h
    geo_hd = plan.geo_dim // h
    if geo_hd % 2:
        raise UserError(f"--geo-dim {plan.geo_dim} gives a geometric head dim of {geo_hd}: RoPE needs it even", 2)
    if geo_hd // 2 > n * d_head // 2:
        raise UserError(f"--geo-dim {plan.geo_dim} keeps {geo_hd // 2} RoPE pairs per kv head, but the teacher's "
                        f"head has only {d_head // 2}" + (f" ({n * d_head // 2} over the {n} merged heads)" if n > 1 else ""), 2)
    if plan.sem_dim // h > n * d_head - geo_hd:
        raise UserError(f"--sem-dim {plan.sem_dim} gives {plan.sem_dim // h} semantic dims per head, more than the "
                        f"{n * d_head - geo_hd} unrotated dims the teacher's head leaves after the geometric pairs", 2)
    if plan.attn_dim // h > n * dv_head:
        raise UserError(f"--attn-dim {plan.attn_dim} gives value heads of {plan.attn_dim // h} dims, more than the "
                        f"teacher's {n * dv_head}", 2)
    student = teacher.replace(attn_mode="decoupled", sem_dim=plan.sem_dim, geo_dim=plan.geo_dim,
                              attn_dim=plan.attn_dim, kv_head=None, decoupled_kv_head=None if k == h else k,
                              tie_qk=False, decoupled_scale="per_path", rope_freqs=rope_freqs)
    t_bytes, s_bytes = kv_bytes(teacher, 1)["total_bytes"], kv_bytes(student, 1)["total_bytes"]
    if smaller and s_bytes >= t_bytes:
        raise UserError(f"the student's cache ({s_bytes:,} bytes/token at fp16) would not be smaller than the "
                        f"teacher's ({t_bytes:,}): lower --sem-dim/--geo-dim/--attn-dim or --kv-head", 2)
    return student


# ---- the linear algebra --------------------------------------------------------------------

def _aug(state, name: str, rows: int, d: int) -> np.ndarray:
    """A Linear's [weight | bias] (rows, d + 1), float64; a zero bias column when it has none."""
    w = np.asarray(state[name + ".weight"], np.float64)
    b = state.get(name + ".bias")
    return np.concatenate([w, np.zeros((rows, 1)) if b is None else np.asarray(b, np.float64)[:, None]], axis=1)


def _sqrt_and_inv(c: np.ndarray, floor: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """C^1/2 and C^-1/2 of a symmetric PSD matrix, eigenvalues floored relative to the largest (a
    direction the inputs never take gets a finite, harmless inverse)."""
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    vals = np.maximum(vals, floor * max(float(vals.max()), 1e-30))
    return (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T


def _top_right(stacked: np.ndarray, r: int) -> np.ndarray:
    """The top-r right singular vectors (columns) of `stacked`."""
    _, _, vt = np.linalg.svd(stacked, full_matrices=False)
    return vt[:r].T


def _energy(w_aug: np.ndarray, m: np.ndarray) -> np.ndarray:
    """E|row . x|^2 per row of w_aug (.., rows, d + 1) under the moment m."""
    return np.einsum("...rd,de,...re->...r", w_aug, m, w_aug)


def select_pairs(contrib_NP: np.ndarray, freqs: np.ndarray, p: int, how: str) -> list[tuple[int, int]]:
    """p (teacher head, pair) picks among a group's n teacher heads x P pairs: by contribution
    (`2norm`), the highest frequencies (`high`) or evenly spaced over the frequency-ordered
    candidates (`uniform`); returned ordered by frequency, highest first."""
    n, pairs = contrib_NP.shape
    by_freq = sorted(((t, i) for t in range(n) for i in range(pairs)), key=lambda ti: (-freqs[ti[1]], ti[0]))
    if how == "2norm":
        ranked = sorted(by_freq, key=lambda ti: -contrib_NP[ti])
        chosen = set(ranked[:p])
    elif how == "high":
        chosen = set(by_freq[:p])
    else:
        idx = np.unique(np.round(np.linspace(0, len(by_freq) - 1, p)).astype(int))
        chosen = {by_freq[j] for j in idx}
    return [ti for ti in by_freq if ti in chosen]


def upcycle_layer(teacher: ModelConfig, student: ModelConfig, state, layer: int, moment: np.ndarray | None,
                  how: str) -> tuple[dict[str, np.ndarray], tuple[tuple[float, ...], ...]]:
    """One layer's student attention tensors (canonical names, float64) and its frequency rows."""
    pre = f"blocks.{layer}.attn."
    d, h = teacher.d_model, teacher.n_head
    t_kv, s_kv = teacher.n_kv_head, student.n_kv_head
    n, g_t = t_kv // s_kv, h // t_kv  # teacher kv heads per student kv head; queries per teacher kv head
    dh, dv = teacher.qk_dim // h, teacher.v_dim // h
    half = dh // 2
    p, r, a = student.geo_dim // h // 2, student.sem_dim // h, student.attn_dim // h
    geo_hd, sem_hd = 2 * p, r
    m = np.eye(d + 1) if moment is None else np.asarray(moment, np.float64)
    freqs = teacher_freqs(teacher)

    wq = _aug(state, pre + "q_proj", h * dh, d).reshape(h, dh, d + 1)
    kname = pre + ("q_proj" if teacher.tie_qk else "k_proj")
    wk = _aug(state, kname, t_kv * dh, d).reshape(t_kv, dh, d + 1)
    wv = _aug(state, pre + "v_proj", t_kv * dv, d).reshape(t_kv, dv, d + 1)
    wo = np.asarray(state[pre + "out_proj.weight"], np.float64).reshape(d, h, dv)
    k_null = v_null = None
    if teacher.null_attn:
        k_null = np.asarray(state[pre + "k_null"], np.float64).reshape(t_kv, dh)
        v_null = np.asarray(state[pre + "v_null"], np.float64).reshape(t_kv, dv)

    # per-pair energies: E|q_{h,i}|^2 and E|k_{t,i}|^2 (both dims of pair i)
    qe, ke = _energy(wq, m), _energy(wk, m)
    q_pair = qe[:, :half] + qe[:, half:]
    k_pair = ke[:, :half] + ke[:, half:]
    # the teacher's 1/sqrt(dh), undoing the student's per-path 1/sqrt(geo_hd) and 1/sqrt(sem_hd)
    geo_scale, sem_scale = math.sqrt(geo_hd / dh), math.sqrt(sem_hd / dh)
    q_geo = np.zeros((h, geo_hd, d + 1))
    q_sem = np.zeros((h, sem_hd, d + 1))
    k_geo, k_sem, v_new = (np.zeros((s_kv, w, d + 1)) for w in (geo_hd, sem_hd, a))
    wo_new = np.zeros((d, h, a))
    k_geo_null, k_sem_null, v_null_new = (np.zeros((s_kv, w)) for w in (geo_hd, sem_hd, a))
    rows: list[tuple[float, ...]] = []
    for g in range(s_kv):
        heads_t = list(range(g * n, (g + 1) * n))  # the group's teacher kv heads
        queries = [(q, t) for t in heads_t for q in range(t * g_t, (t + 1) * g_t)]
        contrib = np.stack([np.sqrt(k_pair[t]) * sum(np.sqrt(q_pair[q]) for q in range(t * g_t, (t + 1) * g_t))
                            for t in heads_t])
        picks = select_pairs(contrib, freqs, p, how)
        rows.append(tuple(float(freqs[i]) for _, i in picks))
        # geometric: rows copied exactly; a query head reads only its own teacher head's pairs
        for j, (tl, i) in enumerate(picks):
            t = heads_t[tl]
            k_geo[g, j], k_geo[g, j + p] = wk[t, i], wk[t, i + half]
            if k_null is not None:
                k_geo_null[g, j], k_geo_null[g, j + p] = k_null[t, i], k_null[t, i + half]
            for q in range(t * g_t, (t + 1) * g_t):
                q_geo[q, j], q_geo[q, j + p] = wq[q, i] * geo_scale, wq[q, i + half] * geo_scale
        # semantic: the unrotated rest, a rank-r form shared by the group's query heads
        kept = {t: set() for t in heads_t}
        for tl, i in picks:
            kept[heads_t[tl]].update((i, i + half))
        rest = {t: [c for c in range(dh) if c not in kept[t]] for t in heads_t}
        k_rest = np.concatenate([wk[t, rest[t]] for t in heads_t])  # (m_total, d + 1)
        offsets = np.cumsum([0] + [len(rest[t]) for t in heads_t])
        ck_half, ck_inv_half = _sqrt_and_inv(k_rest @ m @ k_rest.T)
        blocks = []
        for q, t in queries:
            tl = heads_t.index(t)
            cq_half, _ = _sqrt_and_inv(wq[q, rest[t]] @ m @ wq[q, rest[t]].T)
            blocks.append(cq_half @ ck_half[offsets[tl]:offsets[tl + 1]])
        vr = _top_right(np.concatenate(blocks), r)  # (m_total, r)
        a_map = vr.T @ ck_inv_half  # k_sem = a_map k_rest
        k_sem[g] = a_map @ k_rest
        for q, t in queries:
            tl = heads_t.index(t)
            b_map = vr.T @ ck_half[:, offsets[tl]:offsets[tl + 1]]  # (r, m_t)
            q_sem[q] = b_map @ wq[q, rest[t]] * sem_scale
        if k_null is not None:
            k_sem_null[g] = a_map @ np.concatenate([k_null[t, rest[t]] for t in heads_t])
        # values: the rank-a output map closest to the teacher's
        v_cat = np.concatenate([wv[t] for t in heads_t])  # (n * dv, d + 1)
        cv_half, cv_inv_half = _sqrt_and_inv(v_cat @ m @ v_cat.T)
        outs = [wo[:, q] @ cv_half[heads_t.index(t) * dv:(heads_t.index(t) + 1) * dv] for q, t in queries]
        va = _top_right(np.concatenate(outs), a)  # (n * dv, a)
        c_map = va.T @ cv_inv_half
        v_new[g] = c_map @ v_cat
        for (q, _), o in zip(queries, outs):
            wo_new[:, q] = o @ va
        if v_null is not None:
            v_null_new[g] = c_map @ np.concatenate([v_null[t] for t in heads_t])

    out: dict[str, np.ndarray] = {}

    def linear(name: str, w_aug: np.ndarray) -> None:
        flat = w_aug.reshape(-1, d + 1)
        out[pre + name + ".weight"] = flat[:, :d]
        if student.qkv_bias:
            out[pre + name + ".bias"] = flat[:, d]

    linear("q_sem", q_sem)
    linear("k_sem", k_sem)
    linear("q_geo", q_geo)
    linear("k_geo", k_geo)
    linear("v_proj", v_new)
    out[pre + "out_proj.weight"] = wo_new.reshape(d, h * a)
    if teacher.null_attn:
        out[pre + "k_sem_null"] = k_sem_null.reshape(1, 1, -1)
        out[pre + "k_geo_null"] = k_geo_null.reshape(1, 1, -1)
        out[pre + "v_null"] = v_null_new.reshape(1, 1, -1)
    return out, tuple(rows)


def upcycle(teacher: ModelConfig, state, plan: StudentPlan, moments=None, on_layer=None, *,
            smaller: bool = True) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(student config, student canonical state) from the teacher's; `moments[l]` is layer l's
    (d + 1, d + 1) input moment or None for weights only. Tensors keep the teacher's dtype."""
    from dba.param_shapes import param_shapes

    draft = student_config(teacher, plan, smaller=smaller)
    dtype = np.asarray(state["tok_emb.weight"]).dtype
    new: dict[str, np.ndarray] = {}
    table = []
    for layer in range(teacher.n_layer):
        tensors, rows = upcycle_layer(teacher, draft, state, layer,
                                      None if moments is None else moments[layer], plan.rope_select)
        new.update({k: v.astype(dtype) for k, v in tensors.items()})
        table.append(rows)
        if on_layer is not None:
            on_layer(layer)
    student = student_config(teacher, plan, rope_freqs=tuple(table), smaller=smaller)
    for name in param_shapes(student):
        if name not in new:  # embeddings, norms, MLPs, the head, biases of out_proj, temperature
            new[name] = np.asarray(state[name])
    return student, {k: new[k] for k in param_shapes(student)}
