"""`dba bench upcycle`: the architecture's claim on a model that can do something. A Llama-form GQA
teacher that can retrieve is trained on this Python's standard library, saved in Hugging Face
Llama format and brought back through `dba convert`; its attention is upcycled at three cache
budgets and measured against it, before and after distillation, with quantized caches on top,
beside two baselines.

    dba bench upcycle --dir runs/upcycle              # everything (~45 minutes on 2 CPU cores)
    dba bench upcycle --dir runs/upcycle --json out.json

Stages (each reused when its output exists, so an interrupted run continues):
1. corpus: `dba prepare --corpus python-stdlib --tokenizer bpe:2048` (its by-file held-out split
   is the evaluation data, plain text).
2. recall: the training stream with copies planted (`plant_recall`): in every 256-token chunk,
   either the second half repeats the first (real text), or a span of 8-32 random ids appears
   twice. A 3.5M-parameter model trained on the text alone does not learn to copy (passkey
   0.00-0.03 after 800 steps here; the byte-level teacher of earlier runs, 2000 steps: 0.01-0.04),
   and a teacher that cannot retrieve cannot show whether a student keeps retrieval. About 30% of
   the training tokens are copies; the held-out text stays as it is.
3. teacher: `dba train` of a Llama-form GQA model (RMSNorm, SwiGLU, no learned temperature or
   null attention; 4 layers, d 256, 4 heads of 64 over 2 kv heads, context 256) for
   `--teacher-steps`; exported to a Hugging Face directory (`dba convert RUN DIR/`, transformers'
   LlamaForCausalLM format) and imported again (`dba convert DIR X.safetensors`): the teacher every
   row uses.
4. students, per budget (1/4, 1/8, 1/16 of the teacher's fp16 cache): `dba upcycle --budget`
   (training-free, calibrated on training tokens), then `--blockwise-steps` of blockwise
   distillation, then KL distillation for the rest of the student budget (`--student-tokens`,
   at most 2% of the teacher's tokens by default).
5. `dba eval --teacher` of every row on the held-out files: ppl at the trained context and
   passkey at 10/50/90% depth. The final students also with q8_0 and q4_0 caches.
6. baselines: a decoupled model of each student's shape trained from scratch on the same tokens
   (the students' budget), and the teacher itself with q8_0 / q4_0 / nf4 caches (the bytes a
   quantized cache alone reaches).
Columns: KV bytes/token, x smaller than the teacher's fp16 cache, ppl ratio to the teacher,
delta NLL and KL against it, top-1 agreement, passkey at 10/50/90%, training tokens used.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.common import bench_main, machine, positive_int, print_table, run_complete, run_dba, write_json

TEACHER_FLAGS = ["--attn-mode", "gqa", "--kv-head", "2", "--d-model", "256", "--layers", "4", "--n-head", "4",
                 "--d-ff", "704", "--attn-dim", "256", "--norm", "rmsnorm", "--no-learned-temp"]
BUDGETS = ("1/4", "1/8", "1/16")
WINDOW = 32  # fp16 window of the quantized caches (a quarter of the scored half of each window)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="runs/upcycle", help="where every stage's output goes (reused when present)")
    p.add_argument("--teacher-steps", type=positive_int, default=2400, help="teacher training steps (16 x 256 tokens)")
    p.add_argument("--student-tokens", type=float, default=0.02,
                   help="distillation budget per student, a share of the teacher's training tokens (default 0.02)")
    p.add_argument("--blockwise-steps", type=positive_int, default=20, help="blockwise steps (part of the budget)")
    p.add_argument("--windows", type=positive_int, default=16, help="ppl windows of the evaluation")
    p.add_argument("--passkey-trials", type=positive_int, default=32, help="passkey sequences per depth")
    p.add_argument("--json", default=None, help="also write the results here")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


BATCH, SEQ = 16, 256


def _train(run: Path, *argv: Any) -> None:
    if run_complete(run):
        _say(f"reusing {run}")
        return
    _say(f"training {run.name} ...")
    run_dba("train", *argv, "--batch-size", BATCH, "--train-seq-len", SEQ, "--live", "off", "--log-every", 10,
         "--out-dir", run, "--overwrite", log=run.with_suffix(".log"))


def _eval(ckpt: Path, teacher: Path, data: Path, out: Path, policies: str, args) -> list[dict[str, Any]]:
    if not out.is_file():
        _say(f"evaluating {ckpt.name} ({policies}) ...")
        run_dba("eval", "--ckpt", ckpt, "--data", data, "--split", "all", "--teacher", teacher, "--policies", policies,
             "--tasks", "ppl,passkey", "--contexts", SEQ, "--depths", "0.1,0.5,0.9", "--windows", args.windows,
             "--passkey-trials", args.passkey_trials, "--json", out)
    return json.loads(out.read_text())["records"]


def plant_recall(src: Path, dst: Path, seq: int, seed: int = 0) -> dict[str, Any]:
    """Write `src`'s token stream to `dst` with copies planted in every `seq`-token chunk: with
    probability 1/2 the chunk's second half repeats its first half (real text, copied), else a
    span of 8-32 ids (at most a quarter of the chunk) drawn uniformly from the ids in the stream's first million tokens is written
    at a random place and again after it. `dst` gets `src`'s sidecar (same tokenizer, same held-out
    split, which is left as text) with a "recall" record of what was planted; returns that record.
    Written to temporary names and renamed (`dba.npy_stream.Staged`)."""
    import numpy as np

    from dba.npy_stream import Staged
    from dba.prepared import read_sidecar, sidecar_path

    side = read_sidecar(str(src))
    if side is None:
        raise ValueError(f"{src} has no dba prepare sidecar")
    tokens = np.load(src)
    out = tokens.copy()
    rng = np.random.default_rng(seed)
    ids = np.unique(tokens[:1_000_000])
    half, halves, pairs, copied = seq // 2, 0, 0, 0
    for c in range(len(out) // seq):
        base = c * seq
        if rng.random() < 0.5:
            out[base + half:base + seq] = out[base:base + half]
            halves, copied = halves + 1, copied + half
        else:
            span = int(rng.integers(8, min(33, seq // 4 + 1)))
            a = int(rng.integers(0, seq - 2 * span))
            b = int(rng.integers(a + span, seq - span + 1))
            key = rng.choice(ids, size=span)
            out[base + a:base + a + span] = key
            out[base + b:base + b + span] = key
            pairs, copied = pairs + 1, copied + span
    record = {"source": src.name, "chunk": seq, "seed": seed, "repeated_halves": halves, "planted_pairs": pairs,
              "copied_tokens": copied, "copied_share": copied / max(1, len(out))}
    with Staged() as staged:  # the sidecar is renamed last, as `dba prepare` does
        with open(staged.path(str(dst)), "wb") as f:
            np.save(f, out)
        with open(staged.path(sidecar_path(str(dst))), "w", encoding="utf-8") as f:
            json.dump({**side, "recall": record}, f, indent=1)
        staged.commit()
    return record


def _rows(label: str, records: list[dict[str, Any]], tokens: int, teacher_bytes: float) -> list[dict[str, Any]]:
    """One row per policy of an evaluation: its ppl record and its passkey accuracies."""
    out = []
    for policy in dict.fromkeys(r["policy"] for r in records):
        mine = [r for r in records if r["policy"] == policy]
        ppl = next(r for r in mine if r["task"] == "ppl")
        keys = {r["depth"]: r["accuracy"] for r in mine if r["task"] == "passkey"}
        per_token = ppl["kv_bytes"] / ppl["ctx"]
        out.append({"row": label if policy == "fp16" else f"{label} + {policy.split(',')[0]}",
                    "kv_bytes_per_token": per_token, "x_smaller": teacher_bytes / per_token,
                    "ppl": ppl["ppl"], "ppl_ratio": math.exp(ppl["delta_nll_teacher"]),
                    "delta_nll": ppl["delta_nll_teacher"], "kl": ppl["kl_teacher"], "top1": ppl["top1_teacher"],
                    "passkey": [keys.get(d) for d in (0.1, 0.5, 0.9)], "tokens": tokens})
    return out


def run(args: argparse.Namespace) -> int:
    from fractions import Fraction

    from dba.upcycle import budget_plan
    from dba.weight_files import read_weights

    root = Path(args.dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from dba.errors import UserError

        raise UserError(f"--dir {args.dir!r}: cannot make the working directory ({e.strerror})", 2) from None
    text = root / "stdlib.npy"
    if not text.is_file():
        _say("preparing the stdlib corpus ...")
        run_dba("prepare", "--corpus", "python-stdlib", "--tokenizer", "bpe:2048", "--out", text)
    val = root / "stdlib.val.npy"
    data = root / "stdlib_recall.npy"  # what every stage trains on; the held-out split stays text
    if not data.is_file():
        _say("planting copies in the training stream ...")
        plant_recall(text, data, SEQ)

    # the teacher: trained, exported to transformers' Llama format, imported back
    t_run = root / "teacher_run"
    _train(t_run, "--data", data, *TEACHER_FLAGS, "--steps", args.teacher_steps, "--lr-schedule", "cosine",
           "--warmup-steps", 100, "--min-lr", 2e-4, "--eval-every", 400, "--save-every", 400)
    hf_dir, teacher = root / "teacher_hf", root / "teacher.safetensors"
    if not teacher.is_file():
        _say("exporting the teacher to a Hugging Face Llama directory and importing it back ...")
        run_dba("convert", t_run, hf_dir, "--overwrite")
        run_dba("convert", hf_dir, teacher, "--overwrite")
    t_cfg = read_weights(teacher)[0]
    teacher_tokens = args.teacher_steps * BATCH * SEQ
    student_steps = max(args.blockwise_steps + 1, int(args.student_tokens * teacher_tokens) // (BATCH * SEQ))
    student_tokens = student_steps * BATCH * SEQ
    quant = f"fp16;q8_0,residual={WINDOW};all=q4_0,residual={WINDOW}"

    rows: list[dict[str, Any]] = []
    t_records = _eval(teacher, teacher, val, root / "eval_teacher.json", quant + f";all=nf4,residual={WINDOW}", args)
    t_bytes = next(r for r in t_records if r["task"] == "ppl" and r["policy"] == "fp16")["kv_bytes"] / SEQ
    rows += _rows("teacher (HF Llama, imported)", t_records, teacher_tokens, t_bytes)
    for budget in BUDGETS:
        tag = budget.replace("/", "_")
        plan = budget_plan(t_cfg, Fraction(budget), None, "2norm")
        student = root / f"student_{tag}.safetensors"
        if not student.is_file():
            _say(f"upcycling at {budget} ...")
            run_dba("upcycle", teacher, student, "--budget", budget, "--calib", data, "--calib-tokens", 65536,
                 "--calib-len", SEQ, "--json", root / f"upcycle_{tag}.json", "--overwrite")
        rows += _rows(f"{budget}: training-free", _eval(student, teacher, val, root / f"eval_{tag}_free.json",
                                                       "fp16", args), 0, t_bytes)
        blockwise = root / f"student_{tag}_blockwise"
        _train(blockwise, "--data", data, "--ckpt", student, "--distill-from", teacher, "--distill-blockwise",
               args.blockwise_steps, "--steps", args.blockwise_steps, "--lr", 1e-3, "--eval-every", 0)
        rows += _rows(f"{budget}: blockwise", _eval(blockwise, teacher, val, root / f"eval_{tag}_blockwise.json",
                                                    "fp16", args), args.blockwise_steps * BATCH * SEQ, t_bytes)
        kl = root / f"student_{tag}_kl"
        _train(kl, "--data", data, "--ckpt", blockwise, "--distill-from", teacher, "--distill-loss", "kl",
               "--steps", student_steps - args.blockwise_steps, "--lr", 1e-3, "--lr-schedule", "cosine",
               "--warmup-steps", 5, "--min-lr", 1e-4, "--eval-every", 0)
        rows += _rows(f"{budget}: + KL", _eval(kl, teacher, val, root / f"eval_{tag}_kl.json", quant, args),
                      student_tokens, t_bytes)
        scratch = root / f"scratch_{tag}"
        shape = ["--attn-mode", "decoupled", "--decoupled-kv-head", t_cfg.n_kv_head, "--d-model", t_cfg.d_model,
                 "--layers", t_cfg.n_layer, "--n-head", t_cfg.n_head, "--d-ff", t_cfg.d_ff, "--norm", "rmsnorm",
                 "--no-learned-temp", "--sem-dim", plan.sem_dim, "--geo-dim", plan.geo_dim, "--attn-dim", plan.attn_dim]
        _train(scratch, "--data", data, *shape, "--steps", student_steps, "--eval-every", 0)
        rows += _rows(f"{budget}: from scratch (baseline)",
                      _eval(scratch, teacher, val, root / f"eval_{tag}_scratch.json", "fp16", args),
                      student_tokens, t_bytes)

    headers = ["row", "KV B/token", "x smaller", "ppl", "ppl / teacher", "ΔNLL", "KL", "top-1",
               "passkey 10/50/90%", "tokens"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print_table(f"upcycling a {t_cfg.num_params():,}-parameter Llama-form teacher (stdlib, BPE 2048 ids, context {SEQ}); "
                f"held-out files, against the teacher's fp16 cache",
                headers, [[r["row"], f"{r['kv_bytes_per_token']:,.0f}", f"{r['x_smaller']:.2f}x", f"{r['ppl']:.3f}",
                           f"{r['ppl_ratio']:.3f}", f"{r['delta_nll']:+.4f}", f"{r['kl']:.4f}", f"{r['top1']:.3f}",
                           " / ".join(fmt(a) for a in r["passkey"]), f"{r['tokens']:,}"] for r in rows])
    if args.json:
        write_json(args.json, {"rows": rows, "teacher_tokens": teacher_tokens, "student_tokens": student_tokens,
                               "machine": machine()})
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.upcycle", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
