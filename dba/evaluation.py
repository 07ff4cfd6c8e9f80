"""`dba eval`: what a cache policy costs the model, framework-free (the backends' `evaluate.score_policy`
does the decoding).

Tasks, each run for every policy and context:
- `ppl`: windows of ctx + 1 tokens at evenly spaced offsets of the data. The first half of each
  window is the prompt (fresh attention, as generation's prefill), the second half is decoded
  token by token through the cache and scored: mean NLL and ppl, `delta_nll` against an fp32
  cache on the same tokens, mean KL(fp32 || policy) of the next-token distribution, `top1`
  agreement with the fp32 cache, `kv_bytes` of the policy's cache at ctx (batch 1, as
  `dba kv-mem`), and the number of tokens scored.
- `passkey`: a span of `passkey_len` tokens drawn from the ids the data uses, planted at a depth
  (a fraction of the context) in filler taken from the data, and repeated at the end. Everything
  before the repeat is the prompt; the repeat is decoded token by token, and `accuracy` is the
  fraction of its tokens after the first (the first has no cue) predicted top-1.
- `extrapolate`: `ppl` at 2x and 4x the context the model was trained at.

With a teacher (`dba eval --teacher`, e.g. the model a student was upcycled from) the teacher
decodes the same tokens from its own fp16 cache in the same pass, and every record also carries
`teacher_nll`, `delta_nll_teacher` (the policy's NLL minus the teacher's), `kl_teacher`
(KL(teacher || policy)), `top1_teacher` (top-1 agreement with the teacher) and `teacher_kv_bytes`
(the teacher's fp16 cache at ctx); passkey records add `accuracy_teacher`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dba.errors import UserError
from dba.kvspec import KVPolicy, kv_bytes

TASKS = ("ppl", "passkey", "extrapolate")
RECORD_FIELDS = ("task", "policy", "ctx", "backend", "nll", "ppl", "delta_nll", "kl", "top1", "kv_bytes", "tokens")
PASSKEY_FIELDS = ("depth", "accuracy", "accuracy_fp32")
TEACHER_FIELDS = ("teacher_nll", "delta_nll_teacher", "kl_teacher", "top1_teacher", "teacher_kv_bytes")

# Scores of one policy on a batch: (tokens (B, L), prompt length, policy) -> arrays of SCORES.
Scorer = Callable[[np.ndarray, int, KVPolicy], dict[str, np.ndarray]]


@dataclass(frozen=True)
class EvalPlan:
    contexts: tuple[int, ...]
    tasks: tuple[str, ...] = ("ppl",)
    windows: int = 8  # ppl windows per context (one batch)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_len: int = 8
    passkey_trials: int = 4
    seed: int = 0
    trained_ctx: int = 0  # extrapolate: 2x and 4x this

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise UserError(f"--tasks {','.join(self.tasks)!r}: choose from {', '.join(TASKS)}")
        if not self.contexts or any(c < 4 for c in self.contexts):
            raise UserError(f"--contexts must be token counts >= 4, got {list(self.contexts)}")
        if self.windows < 1 or self.passkey_trials < 1:
            raise UserError("--windows and --passkey-trials must be >= 1")
        if not all(0.0 <= d <= 1.0 for d in self.depths):
            raise UserError(f"--depths must be fractions in [0, 1], got {list(self.depths)}")
        if "passkey" in self.tasks and any(2 * self.passkey_len + 2 > c for c in self.contexts):
            raise UserError(f"--passkey-len {self.passkey_len} needs contexts of at least {2 * self.passkey_len + 2}")

    def units(self) -> list[tuple[str, int, float | None]]:
        """(task, ctx, depth) in the order they run; a depth only for passkey."""
        out: list[tuple[str, int, float | None]] = []
        for task in self.tasks:
            if task == "extrapolate":
                out += [(task, m * self.trained_ctx, None) for m in (2, 4)]
            elif task == "passkey":
                out += [(task, c, d) for c in self.contexts for d in self.depths]
            else:
                out += [(task, c, None) for c in self.contexts]
        return out


def parse_contexts(text: str) -> tuple[int, ...]:
    """'256,1k,4096' -> (256, 1000, 4096) ('k' is 1,000, as in SPEC's 128k)."""
    out = []
    for part in str(text).split(","):
        s = part.strip().lower()
        if not s:
            continue
        try:
            out.append(int(s[:-1]) * 1000 if s.endswith("k") else int(s))
        except ValueError:
            raise UserError(f"--contexts: {part.strip()!r} is not a token count (e.g. 256,1024,4k)") from None
    if not out:
        raise UserError(f"--contexts {text!r} names no context")
    return tuple(out)


def ppl_windows(tokens: np.ndarray, ctx: int, n: int) -> np.ndarray:
    """(n, ctx + 1) int64 windows at evenly spaced offsets of `tokens` (deterministic)."""
    need = ctx + 1
    if len(tokens) < need:
        raise UserError(f"the evaluation data has {len(tokens)} tokens, fewer than one window of ctx + 1 = {need}; "
                        f"use a shorter --contexts or more data")
    starts = np.linspace(0, len(tokens) - need, n).astype(np.int64)
    return np.stack([np.asarray(tokens[s:s + need], dtype=np.int64) for s in starts])


def passkey_sequences(tokens: np.ndarray, ctx: int, depth: float, span: int, trials: int,
                      seed: int) -> tuple[np.ndarray, int]:
    """(trials, ctx) sequences: filler from the data with a random span at `depth` and the span
    again at the end; and the prompt length (everything before the repeat)."""
    if len(tokens) < ctx:
        raise UserError(f"the evaluation data has {len(tokens)} tokens, fewer than the passkey context {ctx}")
    rng = np.random.default_rng([seed, ctx, int(round(depth * 1000))])
    vocab = np.unique(np.asarray(tokens[: min(len(tokens), 1_000_000)], dtype=np.int64))
    filler_len = ctx - 2 * span
    at = int(round(depth * filler_len))
    rows = []
    for start in rng.integers(0, len(tokens) - filler_len + 1, size=trials):
        filler = np.asarray(tokens[start:start + filler_len], dtype=np.int64)
        key = rng.choice(vocab, size=span)
        rows.append(np.concatenate([filler[:at], key, filler[at:], key]))
    return np.stack(rows), ctx - span


def summarize(task: str, policy: str, ctx: int, backend: str, scores: dict[str, np.ndarray], kv: int,
              depth: float | None = None, teacher_kv: int | None = None) -> dict[str, Any]:
    """One record of the JSON output (RECORD_FIELDS, plus PASSKEY_FIELDS for passkey, plus
    TEACHER_FIELDS when the scores hold a teacher's)."""
    nll = float(np.mean(scores["nll"]))
    rec: dict[str, Any] = {
        "task": task, "policy": policy, "ctx": int(ctx), "backend": backend, "nll": nll,
        "ppl": math.exp(min(nll, 700.0)), "delta_nll": float(np.mean(scores["nll"] - scores["ref_nll"])),
        "kl": float(np.mean(scores["kl"])), "top1": float(np.mean(scores["agree"])), "kv_bytes": int(kv),
        "tokens": int(scores["nll"].size)}
    if task == "passkey":
        rec.update(depth=float(depth), accuracy=float(np.mean(scores["correct"])),
                   accuracy_fp32=float(np.mean(scores["ref_correct"])))
    if "teacher_nll" in scores:
        rec.update(teacher_nll=float(np.mean(scores["teacher_nll"])),
                   delta_nll_teacher=float(np.mean(scores["nll"] - scores["teacher_nll"])),
                   kl_teacher=float(np.mean(scores["kl_teacher"])), top1_teacher=float(np.mean(scores["agree_teacher"])),
                   teacher_kv_bytes=int(teacher_kv))
        if task == "passkey":
            rec["accuracy_teacher"] = float(np.mean(scores["teacher_correct"]))
    return rec


@dataclass
class Evaluation:
    """Runs a plan for named policies with one backend's scorer; `records` as they finish."""

    plan: EvalPlan
    cfg: Any
    policies: dict[str, KVPolicy]
    scorer: Scorer
    backend: str
    teacher_cfg: Any = None  # the teacher the scorer also decodes (its fp16 cache's bytes are recorded)
    records: list[dict[str, Any]] = field(default_factory=list)

    def steps(self) -> int:
        return len(self.plan.units()) * len(self.policies)

    def run(self, tokens: np.ndarray, on_step: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        for task, ctx, depth in self.plan.units():
            if task == "passkey":
                batch, n_prompt = passkey_sequences(tokens, ctx, depth, self.plan.passkey_len,
                                                    self.plan.passkey_trials, self.plan.seed)
            else:
                batch = ppl_windows(tokens, ctx, self.plan.windows)
                n_prompt = ctx // 2
            for label, policy in self.policies.items():
                scores = self.scorer(batch, n_prompt, policy)
                kv = kv_bytes(self.cfg, ctx, 1, policy)["total_bytes"]
                t_kv = None if self.teacher_cfg is None else kv_bytes(self.teacher_cfg, ctx, 1)["total_bytes"]
                self.records.append(summarize(task, label, ctx, self.backend, scores, kv, depth, t_kv))
                if on_step is not None:  # after each (task, ctx, depth, policy)
                    on_step(f"{task} ctx {ctx}{'' if depth is None else f' depth {depth:g}'}: {label}")
        return self.records
