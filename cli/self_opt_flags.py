"""v29's `--self-opt*` flags, shared by `dba sample` and `dba eval`, and the glue from them to
dba/self_opt.py's search (calibration tokens, the plan cache, the printed decision)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import numpy as np

from dba.errors import UserError
from dba.self_opt import MODES, SCOPES

# v29 knobs accepted so v29 command lines run as written, with what they mean here.
_V29_ONLY = {
    "self_opt_block_n": ("str", "128", "v29's Triton tile; the decode block is --self-opt-decode-blocks here"),
    "self_opt_hysteresis": ("float", 0.03, "v29's decode-plan hysteresis; here see --self-opt-policy-hysteresis"),
    "self_opt_policy_prefix_len": ("int", None, "v29's calibration prefix; here --self-opt-calib-prefill"),
    "self_opt_policy_warmup": ("int", 1, "untimed runs before timing: one compiling run here"),
    "self_opt_quality_tol": ("float", 0.5, "v29's legacy guard; here --self-opt-quality-delta-nll-tol"),
    "self_opt_stages": ("str", "2,3", "v29's search stages; here screening, quality, speed always"),
    "self_opt_verify": ("bool", False, "quality is always measured through the real decode path here"),
    "self_opt_verify_tol": ("float", 0.005, "see --self-opt-quality-*"),
    "self_opt_warmup": ("int", 1, "untimed runs before timing: one compiling run here"),
    "self_opt_warps": ("str", "4,8", "v29's Triton warps; no effect here"),
}


def add_self_opt_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "self-optimizing cache policy (v29's --self-opt flags)",
        "Picks the cache policy (and decode block) for the target context under a memory budget: "
        "quality first (measured on calibration tokens through the real decode path against an "
        "fp32 cache), then speed, then memory. v29 timed candidates on random K/V and checked "
        "quality only when asked; here quality is always checked.")
    g.add_argument("--self-opt", choices=MODES, default="none",
                   help="startup: decide once for the target context; online: decide for each cache capacity "
                        "as generation grows (doubling), switching with hysteresis")
    g.add_argument("--self-opt-scope", choices=SCOPES, default="all",
                   help="cache: the policy; decode: the decode block; all: both (default all)")
    g.add_argument("--self-opt-mem-budget-mb", type=float, default=None, help="KV-cache budget at the target context")
    g.add_argument("--self-opt-mem-overhead-frac", type=float, default=0.1,
                   help="share of the budget kept for temporaries (default 0.1)")
    g.add_argument("--self-opt-policy-quality", action="store_true",
                   help="accepted for v29 command lines: the quality guard is always on here")
    g.add_argument("--self-opt-quality-kl", action="store_true",
                   help="accepted for v29 command lines: the KL is always measured; give --self-opt-quality-kl-tol to guard it")
    g.add_argument("--self-opt-quality-delta-nll-tol", type=float, default=0.02, help="largest delta NLL vs fp32 (0.02)")
    g.add_argument("--self-opt-quality-kl-tol", type=float, default=None, help="largest mean KL vs fp32 (off)")
    g.add_argument("--self-opt-quality-ppl-ratio-tol", type=float, default=1.02, help="largest ppl ratio vs fp32 (1.02)")
    g.add_argument("--self-opt-calib-prefill", type=int, default=128, help="calibration prompt tokens (128)")
    g.add_argument("--self-opt-calib-decode", type=int, default=32, help="calibration decoded tokens (32)")
    g.add_argument("--self-opt-calib-tokens", default=None, metavar="FILE",
                   help="calibration token file (default: the prompt when long enough, else the run's own data)")
    g.add_argument("--self-opt-k-sem-kinds", default="q4_0,nf4,q8_0,fp16")
    g.add_argument("--self-opt-k-geo-kinds", default="q8_0,q4_0,fp16", help="also the kinds of a non-decoupled k")
    g.add_argument("--self-opt-v-kinds", default="q4_0,q8_0,fp16")
    g.add_argument("--self-opt-residuals", default="0,32,64,128")
    g.add_argument("--self-opt-qblocks", default="16,32,64")
    g.add_argument("--self-opt-decode-blocks", default="256,512,1024,2048")
    g.add_argument("--self-opt-policy-iters", type=int, default=3,
                   help="search effort: up to 4x this many passing and 8x this many scored candidates")
    g.add_argument("--self-opt-prefer-low-mem-within", type=float, default=0.02,
                   help="within this speed fraction of the fastest, the smallest cache wins")
    g.add_argument("--self-opt-policy-hysteresis", type=float, default=0.02,
                   help="online: switch only to a choice faster by more than this fraction (or when over budget)")
    g.add_argument("--self-opt-interval", type=int, default=256,
                   help="online: new tokens in the first cache bucket (capacities then double)")
    g.add_argument("--self-opt-iters", type=int, default=3, help="timed runs per candidate (the best counts)")
    g.add_argument("--self-opt-cache", default=None, metavar="FILE",
                   help="plan file: a decision is reused when model, budget, context and knobs match")
    g.add_argument("--self-opt-fallback", action="store_true",
                   help="when nothing fits or passes, warn and use the base policy instead of failing")
    g.add_argument("--self-opt-verbose", action="store_true", help="print every candidate tried")
    for name, (kind, default, why) in _V29_ONLY.items():
        flag = "--" + name.replace("_", "-")
        if kind == "bool":
            g.add_argument(flag, action="store_true", help=f"v29 flag, no effect: {why}")
        else:
            g.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], default=default,
                           help=f"v29 flag, no effect: {why}")


def options(args: argparse.Namespace):
    from dba.self_opt import options_from_flags

    return options_from_flags(vars(args))


def calibration_tokens(args: argparse.Namespace, o, cfg, prompt: list[int] | None, tokenizer) -> np.ndarray:
    """(1, prefill + decode + 1) ids: the prompt when it is long enough, else the file
    --self-opt-calib-tokens, else the run's own held-out data."""
    need = o.calib_prefill + o.calib_decode + 1
    if prompt is not None and len(prompt) >= need:
        return np.asarray(prompt[:need], dtype=np.int64)[None]
    from dba.data import load_tokens

    if args.self_opt_calib_tokens:
        tokens, _, _ = load_tokens(args.self_opt_calib_tokens, tokenizer=tokenizer, vocab_size=cfg.vocab_size)
        where = args.self_opt_calib_tokens
    else:
        from cli.eval import _run_record

        if _run_record(args.ckpt) is None:
            raise UserError(f"--self-opt needs {need} calibration tokens: give a prompt that long, "
                            f"--self-opt-calib-tokens FILE, or a run directory as --ckpt")
        from cli.eval import load_eval_tokens

        tokens, where = load_eval_tokens(argparse.Namespace(ckpt=args.ckpt, data=None, split="val"), cfg, tokenizer)
    if len(tokens) < need:
        raise UserError(f"--self-opt: {where} has {len(tokens)} tokens, fewer than the {need} calibration tokens "
                        f"(--self-opt-calib-prefill + --self-opt-calib-decode + 1)")
    return np.asarray(tokens[:need], dtype=np.int64)[None]


def decider(args: argparse.Namespace, o, cfg, calib: np.ndarray, score, time_step, base, base_block: int,
            source: str, batch: int = 1) -> Callable[[int], Any]:
    """ctx -> Decision, through the plan cache when --self-opt-cache is given; prints the
    candidates with --self-opt-verbose."""
    from dba.self_opt import candidates_table, choose, load_plan, plan_key, save_plan

    def decide(ctx: int):
        key = plan_key(cfg, source, ctx, o) + f"-b{batch}"
        d = load_plan(args.self_opt_cache, key) if args.self_opt_cache else None
        if d is None:
            d = choose(cfg, ctx, calib, score, time_step, o, base, base_block, batch)
            if o.verbose:
                print("\n".join(candidates_table(d)), file=sys.stderr)
            if args.self_opt_cache:
                save_plan(args.self_opt_cache, key, d)
        return d

    return decide
