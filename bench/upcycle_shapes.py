"""`dba bench upcycle-shapes`: the upcycling commands on the shapes of the models users bring
(Llama-3.2-1B, SmolLM-135M, Qwen2.5-0.5B), with random weights: none can be downloaded here, and
time and memory depend on the shapes, not on the values.

    dba bench upcycle-shapes                                 # all three, 1/8 of the cache
    dba bench upcycle-shapes --model smollm-135m --layers 30 --json out.json

Per model: a Hugging Face directory of its config.json (layers cut to `--layers` where memory
needs it) with random bf16 weights; `dba convert` to dba's export; `dba upcycle --budget` with a
few calibration sequences; then `dba train --ckpt STUDENT --distill-from TEACHER` (bf16 teacher,
KL, batch 1 x 256 tokens) for a few steps. Printed: seconds of each command, each process's peak
RSS (the kernel's VmHWM of the child), and a distillation step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_main, machine, positive_int, print_table, write_json
from bench.convert import LLAMA_3_2_1B, write_source

# The real config.json fields that matter (hub files as published; weights here are random).
SMOLLM_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
               "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
               "tie_word_embeddings": True, "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "bfloat16"}
QWEN2_5_0_5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
                "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                "tie_word_embeddings": True, "rope_theta": 1000000.0, "hidden_act": "silu", "use_sliding_window": False,
                "sliding_window": 32768, "max_window_layers": 21, "torch_dtype": "bfloat16"}
MODELS = {"llama-3.2-1b": (LLAMA_3_2_1B, 8), "smollm-135m": (SMOLLM_135M, 30), "qwen2.5-0.5b": (QWEN2_5_0_5B, 24)}
SEQ = 256

# `dba ARGV...` in this process, then its own peak RSS (VmHWM, kB) on the last line of stdout
_REPORTING = ("import sys\n"
              "from cli.main import main\n"
              "rc = main(sys.argv[1:])\n"
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
              "print('VmHWM', hwm[0].split()[1] if hwm else 'unknown')\n"
              "sys.exit(rc)\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=(*MODELS, "all"), default="all")
    p.add_argument("--layers", type=positive_int, default=None,
                   help="transformer layers (default: all of SmolLM's and Qwen's, 8 of Llama-3.2-1B's 16)")
    p.add_argument("--budget", default="1/8", help="the student's share of the teacher's fp16 cache")
    p.add_argument("--steps", type=positive_int, default=3, help="distillation steps (the last is timed)")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    p.add_argument("--json", default=None, metavar="OUT")


def _dba(*argv: Any) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of `dba ARGV` in a fresh process; a failure is a one-line error."""
    import time

    from dba.errors import UserError

    argv = [str(a) for a in argv]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _REPORTING, *argv], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    took = time.perf_counter() - t0
    last = r.stdout.strip().splitlines()[-1].split() if r.stdout.strip() else []
    if r.returncode != 0 or len(last) != 2 or not last[1].isdigit():
        raise UserError(f"`dba {' '.join(argv[:2])} ...` failed (exit {r.returncode}): "
                        f"{(r.stderr.strip().splitlines() or ['?'])[-1]}", 1)
    return took, int(last[1]) * 1024


def _one(name: str, layers: int, args, root: Path) -> dict[str, Any]:
    from dba.runlog import read_events

    config, _ = MODELS[name]
    config = {**config, "num_hidden_layers": layers}
    d = root / name
    hf, teacher, student = d / "hf", d / "teacher.safetensors", d / "student.safetensors"
    print(f"{name}: writing a random {layers}-layer model ...", file=sys.stderr, flush=True)
    write_source(hf, config, shards=1)
    tokens = d / "tokens.npy"
    rng = np.random.default_rng(0)
    np.save(tokens, rng.integers(0, config["vocab_size"], 64 * SEQ).astype(np.uint32))
    out: dict[str, Any] = {"model": name, "layers": layers}
    out["convert_s"], out["convert_peak"] = _dba("convert", hf, teacher, "--overwrite")
    print(f"{name}: upcycling ...", file=sys.stderr, flush=True)
    out["upcycle_s"], out["upcycle_peak"] = _dba("upcycle", teacher, student, "--budget", args.budget, "--calib",
                                                  tokens, "--calib-tokens", 4 * SEQ, "--calib-len", SEQ,
                                                  "--json", d / "upcycle.json", "--overwrite")
    up = json.loads((d / "upcycle.json").read_text())
    out.update(teacher_kv=up["teacher_kv_bytes_per_token"], student_kv=up["student_kv_bytes_per_token"])
    print(f"{name}: distilling {args.steps} steps ...", file=sys.stderr, flush=True)
    run = d / "distill"
    out["distill_s"], out["distill_peak"] = _dba(
        "train", "--data", tokens, "--ckpt", student, "--distill-from", teacher, "--distill-teacher-dtype", "bf16",
        "--distill-loss", "kl", "--batch-size", 1, "--train-seq-len", SEQ, "--steps", args.steps, "--eval-every", 0,
        "--log-every", 1, "--live", "off", "--out-dir", run, "--overwrite")
    train = read_events(run / "train.jsonl", "train")
    out["step_s"] = train[-1]["step_ms"] / 1000.0
    from dba.weight_files import read_weights

    t_cfg, s_cfg = read_weights(teacher)[0], read_weights(student)[0]
    out.update(teacher_params=t_cfg.num_params(), student_params=s_cfg.num_params(),
               dims=f"sem {s_cfg.sem_dim} / geo {s_cfg.geo_dim} / v {s_cfg.attn_dim}, {s_cfg.n_kv_head} kv")
    shutil.rmtree(d, ignore_errors=True)
    return out


def run(args: argparse.Namespace) -> int:
    from fractions import Fraction

    from dba.errors import UserError

    try:
        Fraction(args.budget)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--budget {args.budget!r}: expected a fraction like 1/8", 2) from None
    names = list(MODELS) if args.model == "all" else [args.model]
    if args.dir:
        try:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--dir {args.dir!r}: cannot make the working directory ({e.strerror})", 2) from None
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dba-upcycle-shapes-"))
    rows = []
    try:
        for name in names:
            rows.append(_one(name, args.layers or MODELS[name][1], args, root))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print_table(f"dba upcycle --budget {args.budget} and KL distillation (bf16 teacher, batch 1 x {SEQ}) on real "
                f"shapes, random weights; {machine()['processor']}, {machine()['cpus']} CPUs",
                ["model", "layers", "teacher params", "student", "KV B/token teacher -> student", "convert s",
                 "upcycle s (peak)", "distill step s", "distill peak"],
                [[r["model"], r["layers"], f"{r['teacher_params']:,}", r["dims"],
                  f"{r['teacher_kv']:,} -> {r['student_kv']:,}", f"{r['convert_s']:.1f}",
                  f"{r['upcycle_s']:.1f} ({gib(r['upcycle_peak'])})", f"{r['step_s']:.2f}", gib(r["distill_peak"])]
                 for r in rows])
    if args.json:
        write_json(args.json, {"rows": rows, "machine": machine()})
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.upcycle_shapes", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
