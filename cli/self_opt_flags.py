"""v29's `--self-opt*` flags, shared by `dba sample` and `dba eval`, and the glue from them to
dba/self_opt.py's search (calibration tokens, the plan cache, the printed decision)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import numpy as np

from dba.errors import UserError
from dba.flags import add_flags
from dba.self_opt import ALL_SELF_OPT_FLAGS

def add_self_opt_arguments(p: argparse.ArgumentParser) -> None:
    """v29's --self-opt flags (dba.self_opt's tables), one argument group."""
    g = p.add_argument_group(
        "self-optimizing cache policy (v29's --self-opt flags)",
        "Picks the cache policy (and decode block) for the target context under a memory budget: "
        "quality first (measured on calibration tokens through the real decode path against an "
        "fp32 cache), then speed, then memory. v29 timed candidates on random K/V and checked "
        "quality only when asked; here quality is always checked.")
    add_flags(g, ALL_SELF_OPT_FLAGS)


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
        from cli.checkpoint import run_record, run_tokens

        if run_record(args.ckpt) is None:
            raise UserError(f"--self-opt needs {need} calibration tokens: give a prompt that long, "
                            f"--self-opt-calib-tokens FILE, or a run directory as --ckpt")
        tokens, where = run_tokens(argparse.Namespace(ckpt=args.ckpt, data=None, split="val"), cfg, tokenizer)
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
