"""`dba eval`: what a KV-cache policy costs the model: perplexity, KL and top-1 agreement against
an fp32 cache, passkey retrieval and extrapolation, all through the real cached decode path.

    dba eval --ckpt runs/default                          # its held-out split, ppl at its context
    dba eval --ckpt best.pt --data val.npy --policies "fp16;q4_0;k_sem=q4_0+rot,k_geo=q8_0,v=q4_0" \\
        --contexts 512,1024 --tasks ppl,passkey,extrapolate --json eval.json --plot pareto.png

Tasks and fields: see dba/evaluation.py. Reads the checkpoint and data only; never takes a run
directory's lock, so it works on a run in progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli.checkpoint import checkpoint_tokenizer, run_tokens
from cli.kv_flags import add_kv_fused_argument, checked_kv_fused, resolve_kv_fused
from cli.self_opt_flags import add_self_opt_arguments
from dba.data import DATA_FORMATS, TOKEN_DTYPES
from dba.errors import UserError
from dba.evaluation import TASKS
from dba.kvspec import KV_KINDS, POLICY_SYNTAX

DEFAULT_POLICIES = "fp16,q8_0,q4_0,nf4"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (__doc__ or "").split("\n\n")[0]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "cache policies (--policies):\n" + POLICY_SYNTAX + (
        "\n\nSeveral policies are separated by ';'. A list of bare kinds may use ',' instead "
        f"(the default is {DEFAULT_POLICIES}).")
    p.add_argument("--ckpt", required=True, help="run directory, .safetensors export or v29 .pt")
    d = p.add_argument_group("data (default: the run's own data, its held-out split)")
    d.add_argument("--data", default=None, help="token file (.npy / .bin / text), as `dba train --data`")
    d.add_argument("--data-format", choices=DATA_FORMATS, default="auto")
    d.add_argument("--data-dtype", choices=TOKEN_DTYPES, default="uint16")
    d.add_argument("--split", choices=("val", "all"), default="val",
                   help="val: the tail the run held out (its --val-frac, else 0.1); all: every token")
    e = p.add_argument_group("evaluation")
    e.add_argument("--backend", choices=("jax", "torch"), default="jax")
    e.add_argument("--device", default=None, help="jax: cpu|gpu|tpu; torch: cpu|cuda|mps (default: the best there is)")
    e.add_argument("--policies", default=DEFAULT_POLICIES, help="cache policies to measure (see below)")
    e.add_argument("--contexts", default=None, help="contexts, e.g. 256,1024,4k (default: the model's context)")
    e.add_argument("--tasks", default="ppl", help=f"comma-separated: {', '.join(TASKS)}")
    e.add_argument("--windows", type=int, default=8, help="ppl windows per context (one batch)")
    e.add_argument("--depths", default="0.1,0.5,0.9", help="passkey depths, fractions of the context")
    e.add_argument("--passkey-len", type=int, default=8, help="tokens in the passkey span")
    e.add_argument("--passkey-trials", type=int, default=4, help="passkey sequences per depth (one batch)")
    e.add_argument("--decode-block", type=int, default=1024, help="keys per block when streaming the cache")
    add_kv_fused_argument(e)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--teacher", default=None, metavar="CKPT",
                   help="also compare every policy with this model (e.g. the one an upcycled student came from) "
                        "decoding the same tokens from its fp16 cache: teacher_nll, delta_nll_teacher, kl_teacher, "
                        "top1_teacher, teacher_kv_bytes (passkey: accuracy_teacher)")
    add_self_opt_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="OUT", help="write one record per (task, policy, ctx[, depth])")
    o.add_argument("--plot", default=None, metavar="OUT.png", help="KV bytes/token vs delta_nll, one point per policy")


def parse_policies(text: str) -> dict[str, Any]:
    """'fp16,q4_0' or 'fp16;k_sem=q4_0,k_geo=q8_0,v=q4_0' -> {label: KVPolicy}."""
    from dba.kvspec import parse_policy

    out: dict[str, Any] = {}
    for part in (t.strip() for t in str(text).split(";")):
        if not part:
            continue
        items = [t.strip() for t in part.split(",")]
        labels = items if all(t in (*KV_KINDS, "hetero") for t in items) else [part]
        for label in labels:
            out[label] = parse_policy(label)
    if not out:
        raise UserError(f"--policies {text!r} names no cache policy")
    return out


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _check_memory(cfg, policies, plan, batch: int) -> None:
    """Refuse contexts whose caches cannot fit this host (both the policy's and the fp32 one)."""
    from dba.kvspec import KVPolicy, kv_bytes
    from dba.resources import host_memory_bytes
    from dba.units import human_bytes

    limit = host_memory_bytes()
    if limit is None:
        return
    for _, ctx, _ in plan.units():
        need = max(kv_bytes(cfg, ctx, batch, p)["total_bytes"] for p in policies.values())
        need += kv_bytes(cfg, ctx, batch, KVPolicy(kind="fp32"))["total_bytes"]
        if need > 0.8 * limit:
            raise UserError(f"--contexts {ctx}: the caches of one batch need ~{human_bytes(need, 'iec')} but the host "
                            f"has {human_bytes(limit, 'iec')}; use a shorter context or fewer --windows/--passkey-trials", 1)


def _checked_modes(args: argparse.Namespace, backend: str, model, kv_fused: str):
    """(policy, batch, tokens per row, decode block) -> the decode mode for that shape: `auto`'s
    kernel once it has matched the cached attention there (cli/kv_flags.checked_kv_fused; a cache
    holds tokens - 1 positions), asked once per shape in this run."""
    modes: dict[tuple, str] = {}

    def mode(policy, batch: int, length: int, block: int) -> str:
        key = (repr(policy), int(batch), int(length), int(block))
        if key not in modes:
            modes[key] = checked_kv_fused(args.kv_fused, kv_fused, backend, model, policy, int(batch),
                                          int(length) - 1, int(block))
        return modes[key]

    return mode


def _scorer(args: argparse.Namespace, cfg, state, source: str, teacher=None):
    """(score function, decode-step timer, device text) of the chosen backend. The score function
    `(tokens, n_prompt, policy, with_teacher=False)` also decodes `teacher` ((config, state,
    source) or None) when asked."""
    if args.backend == "torch":
        import torch_ref
        from torch_ref.devices import torch_device
        from torch_ref.evaluate import decode_step_seconds, score_policy

        model = torch_ref.load_canonical(torch_ref.DBAModel(cfg), state, source)
        model = model.to(torch_device(args.device)).eval()
        t_model = None
        if teacher is not None:
            t_model = torch_ref.load_canonical(torch_ref.DBAModel(teacher[0]), teacher[1], teacher[2])
            t_model = t_model.to(model.device).eval()
        kv_fused, fused = resolve_kv_fused(args.kv_fused, "torch", model.device)
        mode = _checked_modes(args, "torch", model, kv_fused)
        return ((lambda b, n, p, with_teacher=False: score_policy(
                    model, b, n, p, decode_block=args.decode_block, kv_fused=mode(p, *b.shape, args.decode_block),
                    teacher=t_model if with_teacher else None)),
                (lambda p, ctx, n, blk: decode_step_seconds(model, p, ctx, n, blk, repeats=args.self_opt_iters,
                                                            kv_fused=mode(p, 1, ctx + 1, blk))),
                f"{model.device}, decode kernel {fused}")
    from jax_model.devices import select_platform

    select_platform(args.device)
    import jax

    import jax_model
    from jax_model.evaluate import decode_step_seconds, score_policy

    model = jax_model.load_canonical(jax_model.DBAModel(cfg), state, source)
    t_model = None
    if teacher is not None:
        t_model = jax_model.load_canonical(jax_model.DBAModel(teacher[0]), teacher[1], teacher[2])
    kv_fused, fused = resolve_kv_fused(args.kv_fused, "jax")
    mode = _checked_modes(args, "jax", model, kv_fused)
    return ((lambda b, n, p, with_teacher=False: score_policy(
                model, b, n, p, decode_block=args.decode_block, kv_fused=mode(p, *b.shape, args.decode_block),
                teacher=t_model if with_teacher else None)),
            (lambda p, ctx, n, blk: decode_step_seconds(model, p, ctx, n, blk, repeats=args.self_opt_iters,
                                                        kv_fused=mode(p, 1, ctx + 1, blk))),
            f"{jax.devices()[0]}, decode kernel {fused}")


def _plan(args: argparse.Namespace, cfg):
    from dba.evaluation import EvalPlan, parse_contexts

    for flag in ("windows", "passkey_len", "passkey_trials", "decode_block"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.passkey_len < 2:
        raise UserError(f"--passkey-len must be >= 2 (the first token of the repeat has no cue), got {args.passkey_len}")
    contexts = parse_contexts(args.contexts) if args.contexts else (cfg.block_size,)
    return EvalPlan(contexts=contexts, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                    windows=args.windows, depths=_floats(args.depths, "--depths"), passkey_len=args.passkey_len,
                    passkey_trials=args.passkey_trials, seed=args.seed, trained_ctx=cfg.block_size)


def run(args: argparse.Namespace) -> int:
    from dba.evaluation import Evaluation
    from dba.weight_files import read_weights

    for out, suffix in ((args.json, None), (args.plot, ".png")):
        if out is not None and not Path(out).resolve().parent.is_dir():
            raise UserError(f"output directory {str(Path(out).parent)!r} does not exist")
        if out is not None and suffix and Path(out).suffix.lower() != suffix:
            raise UserError(f"--plot {out!r}: the plot is a PNG; give a name ending in .png")
    cfg, state, info = read_weights(args.ckpt)
    policies = parse_policies(args.policies)
    for p in policies.values():
        p.check_for(cfg)
    plan = _plan(args, cfg)
    tokenizer = checkpoint_tokenizer(info.get("metadata"), info["source"])
    tokens, source = run_tokens(args, cfg, tokenizer)
    teacher = _teacher(args.teacher, cfg, plan) if args.teacher else None
    _check_memory(cfg, policies, plan, max(plan.windows, plan.passkey_trials))
    scorer, timer, device = _scorer(args, cfg, state, info["source"], teacher)
    policies.update(_self_opt_policy(args, cfg, plan, tokens, scorer, timer, info["source"], tokenizer))
    with_teacher = (lambda b, n, p: scorer(b, n, p, with_teacher=True)) if teacher else scorer
    ev = Evaluation(plan, cfg, policies, with_teacher, args.backend, teacher_cfg=teacher[0] if teacher else None)
    t0 = time.perf_counter()
    _run_with_progress(ev, tokens)
    elapsed = time.perf_counter() - t0
    scored = sum(r["tokens"] for r in ev.records)
    _print_table(ev.records, cfg, f"{args.ckpt} on {source}; {args.backend} on {device}; "
                 f"{scored:,} tokens scored per cache pair in {elapsed:.1f}s ({2 * scored / elapsed:,.0f} decoded tok/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"records": ev.records, "ckpt": str(args.ckpt), "data": source,
                                               "config": cfg.to_dict()}, indent=2))
    if args.plot:
        from dba.plots import plot_pareto

        plot_pareto(ev.records, args.plot, title=f"{Path(args.ckpt).name}: {cfg.attn_mode}",
                    teacher=None if teacher is None else Path(args.teacher).name)
    return 0


def _teacher(path: str, cfg, plan):
    """(config, state, source) of --teacher: same vocabulary as the model, a context the plan's
    longest evaluation fits (RoPE extends; the model's own rule for contexts applies)."""
    from dba.weight_files import read_weights

    t_cfg, t_state, t_info = read_weights(path)
    if t_cfg.vocab_size != cfg.vocab_size:
        raise UserError(f"--teacher {path!r}: its vocabulary is {t_cfg.vocab_size} ids, the model's {cfg.vocab_size}: "
                        f"a teacher must speak the same tokens", 2)
    longest = max(c for _, c, _ in plan.units())
    if t_cfg.block_size < longest:
        t_cfg = t_cfg.replace(block_size=longest)
    return t_cfg, t_state, t_info["source"]


def _self_opt_policy(args, cfg, plan, tokens, scorer, timer, source: str, tokenizer) -> dict[str, Any]:
    """--self-opt: the policy the search picks for the longest context evaluated (both modes:
    an evaluation does not grow its cache), added as one more policy, labelled `self-opt`."""
    import numpy as np

    from cli.self_opt_flags import decider, options
    from dba.kvspec import KVPolicy

    o = options(args)
    if o.mode == "none":
        return {}
    need = o.calib_prefill + o.calib_decode + 1
    if len(tokens) < need:
        raise UserError(f"--self-opt: the evaluation data has {len(tokens)} tokens, fewer than the {need} "
                        f"calibration tokens (--self-opt-calib-prefill + --self-opt-calib-decode + 1)")
    calib = np.asarray(tokens[:need], dtype=np.int64)[None]
    ctx = max(c for _, c, _ in plan.units())
    d = decider(args, o, cfg, calib, scorer, timer, KVPolicy.from_flags({}), args.decode_block, source)(ctx)
    print(d.line(), file=sys.stderr)
    return {f"self-opt: {d.label}": d.policy}


def _run_with_progress(ev, tokens) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=ev.steps())
        ev.run(tokens, lambda done: bar.update(task, advance=1, description=done))


def _print_table(records: list[dict[str, Any]], cfg, caption: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from dba.units import human_bytes

    passkey = any(r["task"] == "passkey" for r in records)
    teacher = any("teacher_nll" in r for r in records)
    t = Table(title=f"Cache quality: {cfg.attn_mode} model, {cfg.num_params():,} parameters", caption=caption)
    t_cols = ["teacher KV", "Δnll vs teacher", "KL vs teacher", "top-1 vs teacher"] if teacher else []
    for col in ("task", "policy", "ctx", *(["depth"] if passkey else []), "KV cache", "nll", "ppl", "Δnll vs fp32",
                "KL", "top-1", *t_cols, *(["passkey acc (fp32)" + (", teacher" if teacher else "")] if passkey else []),
                "tokens"):
        t.add_column(col, justify="left" if col in ("task", "policy") else "right", overflow="fold")
    for r in records:
        depth = [f"{r['depth']:g}" if "depth" in r else "-"] if passkey else []
        tt = ([human_bytes(r["teacher_kv_bytes"]), f"{r['delta_nll_teacher']:+.5f}", f"{r['kl_teacher']:.2e}",
               f"{r['top1_teacher']:.3f}"] if teacher else [])
        acc_t = f", {r['accuracy_teacher']:.3f}" if teacher and "accuracy_teacher" in r else ""
        acc = [f"{r['accuracy']:.3f} ({r['accuracy_fp32']:.3f}{acc_t})" if "accuracy" in r else "-"] if passkey else []
        t.add_row(r["task"], r["policy"], str(r["ctx"]), *depth, human_bytes(r["kv_bytes"]), f"{r['nll']:.4f}",
                  f"{r['ppl']:.2f}", f"{r['delta_nll']:+.5f}", f"{r['kl']:.2e}", f"{r['top1']:.3f}", *tt, *acc,
                  f"{r['tokens']:,}")
    out = Console(file=sys.stdout)
    if not out.is_terminal:  # piped: wide enough that nothing is cut
        out = Console(file=sys.stdout, width=220)
    out.print(t)
