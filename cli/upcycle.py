"""`dba upcycle TEACHER OUT.safetensors`: a pretrained standard/GQA model's attention rewritten as
decoupled attention (dba/upcycle.py), then measured against the teacher before any training.

    dba upcycle runs/teacher student.safetensors --sem-dim 64 --geo-dim 128 --attn-dim 256
    dba upcycle llama.safetensors s.safetensors --sem-dim 512 --geo-dim 1024 --attn-dim 1024 --calib data.npy
    dba upcycle HF_DIR s.safetensors --budget 1/8          (dims chosen for 1/8 of the teacher's cache)

TEACHER is a standard/gqa dba checkpoint (run directory, .safetensors export, v29 .pt) or a
Hugging Face Llama/Mistral/Qwen2 directory (imported as by `dba convert`). The geometric part keeps
each kv head's most contributing RoPE pairs at the teacher's frequencies (recorded in the
student); the semantic part and the values are the best low-rank maps of the rest, weighted by
the calibration tokens' activations. The student is written with the teacher's tokenizer record;
then teacher and student are scored on the calibration tokens (NLL, KL, top-1) and the KV bytes
per token of both are printed. Nothing is written on a mistake; OUT is written to a temporary name
and renamed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from dba.errors import UserError


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _fraction(text: str) -> Fraction:
    try:
        f = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction like 1/8") from None
    if not 0 < f < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1 (a share of the teacher's cache)")
    return f


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dba.upcycle import ROPE_SELECT

    p.description = (__doc__ or "").split("\n\n")[0]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (__doc__ or "").split("\n\n", 1)[1]
    p.add_argument("teacher", help="standard/gqa checkpoint (run dir, .safetensors, v29 .pt) or a Hugging Face directory")
    p.add_argument("out", help="the student, a .safetensors export")
    d = p.add_argument_group("the student's attention (summed over query heads, as ModelConfig's)")
    d.add_argument("--sem-dim", type=_positive, help="semantic (unrotated) Q/K width")
    d.add_argument("--geo-dim", type=_positive, help="geometric (RoPE) Q/K width: geo_dim / n_head / 2 pairs per head")
    d.add_argument("--attn-dim", type=_positive, help="V width")
    d.add_argument("--kv-head", type=_positive, default=None,
                   help="student kv heads (default the teacher's; must divide them)")
    d.add_argument("--budget", type=_fraction, default=None,
                   help="instead of the dims: a share of the teacher's fp16 cache (e.g. 1/8); dims split as "
                        "the recipe's sem:geo:v = 1:2:3 per head")
    d.add_argument("--rope-select", choices=ROPE_SELECT, default="2norm",
                   help="which RoPE pairs the geometric part keeps: largest score contribution (default), "
                        "highest frequencies, or evenly spaced")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default=None, metavar="DATA",
                   help="calibration tokens: a token file or text (default: the teacher run's data, else the "
                        "built-in corpus through the teacher's tokenizer)")
    c.add_argument("--data-format", default="auto", help="format of --calib (as dba train's --data-format)")
    c.add_argument("--calib-tokens", type=_positive, default=16384, help="calibration tokens used (default 16384)")
    c.add_argument("--calib-len", type=_positive, default=None,
                   help="calibration sequence length (default min(block_size, 512))")
    c.add_argument("--no-calib", action="store_true",
                   help="weights only: no activation weighting (the maps are SVDs of the weights)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix != ".safetensors":
        raise UserError(f"{str(out)!r}: the student is written as a .safetensors export", 2)
    if out.exists() and not overwrite:
        raise UserError(f"{str(out)!r} already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise UserError(f"output directory {str(out.parent)!r} does not exist")


def _teacher(path: str, tmp: Path):
    """(config, canonical state, metadata, source) of the teacher; a Hugging Face directory is
    imported into `tmp` first."""
    from cli.convert import is_hf_dir
    from dba.weight_files import read_weights

    src = Path(path)
    if is_hf_dir(src):
        from dba.hf_import import convert

        dst = tmp / "teacher.safetensors"
        convert(src, dst)
        path = str(dst)
    cfg, state, info = read_weights(path)
    return cfg, state, info.get("metadata") or {}, info["source"]


def _calibration_tokens(args, cfg, metadata, teacher_path: str) -> tuple[np.ndarray, str]:
    """(N, L) calibration sequences and where they came from."""
    from cli.checkpoint import checkpoint_tokenizer, run_record
    from dba.data import load_tokens
    from train.args import saved_flags

    tokenizer = checkpoint_tokenizer(metadata, teacher_path)
    path, fmt = args.calib, args.data_format
    if path is None:
        meta = run_record(teacher_path)
        flags = saved_flags((meta or {}).get("flags") or {})
        path, fmt = flags.get("data"), flags.get("data_format", "auto")
    if path is None and tokenizer is None and cfg.vocab_size != 256:
        raise UserError(f"the teacher records no tokenizer and its vocabulary is {cfg.vocab_size} ids: give "
                        f"calibration tokens with --calib", 2)
    tokens, _, _ = load_tokens(path, data_format=fmt, tokenizer=tokenizer)
    top = int(tokens.max())
    if top >= cfg.vocab_size:
        raise UserError(f"calibration data {path or 'default corpus'!r} has token id {top}, outside the teacher's "
                        f"vocabulary of {cfg.vocab_size} ids: it was made with another tokenizer", 2)
    length = args.calib_len or min(cfg.block_size, 512)
    if length > cfg.block_size:
        raise UserError(f"--calib-len {length} is longer than the teacher's context ({cfg.block_size})", 2)
    n = min(args.calib_tokens, tokens.size) // length
    if n < 1:
        raise UserError(f"calibration data {path or 'default corpus'!r} holds {tokens.size} tokens, fewer than one "
                        f"sequence of {length}", 2)
    return np.asarray(tokens[:n * length], np.int64).reshape(n, length), path or "default corpus"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dba.kvspec import kv_bytes
    from dba.upcycle import StudentPlan, budget_plan, student_config, upcycle
    from dba.weights import save_safetensors

    out = Path(args.out)
    _check_out(out, args.overwrite)
    dims = (args.sem_dim, args.geo_dim, args.attn_dim)
    if args.budget is None and None in dims:
        raise UserError("give the student's --sem-dim, --geo-dim and --attn-dim, or --budget (e.g. 1/8)", 2)
    if args.budget is not None and any(v is not None for v in dims):
        raise UserError("--budget chooses the dims: drop --sem-dim/--geo-dim/--attn-dim, or drop --budget", 2)
    if args.no_calib and args.calib:
        raise UserError("--no-calib and --calib contradict each other", 2)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="dba-upcycle-", dir=out.parent) as tmp:
        cfg, state, metadata, source = _teacher(args.teacher, Path(tmp))
        plan = (budget_plan(cfg, args.budget, args.kv_head, args.rope_select) if args.budget is not None else
                StudentPlan(args.sem_dim, args.geo_dim, args.attn_dim, args.kv_head, args.rope_select))
        student_config(cfg, plan)  # every impossible plan, before any work
        tokens, calib_source = _calibration_tokens(args, cfg, metadata, args.teacher)

        import jax_model
        from jax_model.calibrate import attention_input_moments
        from jax_model.evaluate import score_against

        teacher = jax_model.load_canonical(jax_model.DBAModel(cfg),
                                           {k: np.asarray(v, np.float32) for k, v in state.items()})
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=console, disable=not console.is_terminal)
        with progress:
            moments = None
            if not args.no_calib:
                task = progress.add_task("calibrate", total=len(tokens))
                moments = attention_input_moments(teacher, tokens, on_batch=lambda n: progress.advance(task, n))
            task = progress.add_task("upcycle layers", total=cfg.n_layer)
            s_cfg, s_state = upcycle(cfg, state, plan, moments, on_layer=lambda _: progress.advance(task))
            del state, moments  # only the two models are needed from here: peak memory
            extra = {"upcycled_from": str(source), "upcycle": json.dumps(
                {"sem_dim": plan.sem_dim, "geo_dim": plan.geo_dim, "attn_dim": plan.attn_dim,
                 "kv_head": s_cfg.n_kv_head, "rope_select": plan.rope_select,
                 "calibration": None if args.no_calib else {"source": calib_source, "tokens": int(tokens.size)}})}
            if metadata.get("tokenizer"):
                extra["tokenizer"] = metadata["tokenizer"]
            save_safetensors(out, s_cfg, s_state, extra)
            student = jax_model.load_canonical(jax_model.DBAModel(s_cfg),
                                               {k: np.asarray(v, np.float32) for k, v in s_state.items()})
            del s_state
            task = progress.add_task("score vs teacher", total=len(tokens))
            scores = score_against(student, teacher, tokens, on_batch=lambda n: progress.advance(task, n))
    t_bytes = kv_bytes(cfg, 1)["total_bytes"]
    s_bytes = kv_bytes(s_cfg, 1)["total_bytes"]
    result = {"teacher": str(source), "student": str(out), "student_config": s_cfg.to_dict(),
              "teacher_kv_bytes_per_token": t_bytes, "student_kv_bytes_per_token": s_bytes,
              "x_smaller": t_bytes / s_bytes, "calib_tokens": int(tokens.size), "calibration": calib_source,
              "weighted": not args.no_calib, "teacher_nll": float(scores["ref_nll"].mean()),
              "student_nll": float(scores["nll"].mean()),
              "delta_nll": float(scores["nll"].mean() - scores["ref_nll"].mean()),
              "kl": float(scores["kl"].mean()), "top1_agree": float(scores["agree"].mean())}
    print(f"wrote {out}: decoupled sem {plan.sem_dim} / geo {plan.geo_dim} / v {plan.attn_dim}, "
          f"{s_cfg.n_kv_head} kv heads, {s_cfg.num_params():,} parameters (teacher {cfg.num_params():,})")
    print(f"training-free, on {tokens.size:,} calibration tokens ({calib_source}):")
    print("| KV bytes/token (fp16) teacher | student | x smaller | teacher NLL | student NLL | ΔNLL | KL | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {t_bytes:,} | {s_bytes:,} | {t_bytes / s_bytes:.2f}x | {result['teacher_nll']:.4f} | "
          f"{result['student_nll']:.4f} | {result['delta_nll']:+.4f} | {result['kl']:.4f} | {result['top1_agree']:.3f} |")
    if args.json:
        tmp_json = Path(args.json + ".tmp")
        tmp_json.write_text(json.dumps(result, indent=2) + "\n")
        tmp_json.replace(args.json)
    return 0
