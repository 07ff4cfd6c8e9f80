"""`dba sample`: generate from a checkpoint with the torch reference (default) or JAX.

The torch backend never imports JAX, so a laptop with only torch can sample from weights
trained in the cloud. Text in and out when the checkpoint carries a tokenizer (runs on text,
and runs on token ids trained with `--tokenizer`, record one), token ids otherwise (v29
checkpoints). A recorded tokenizer whose files cannot be had here (tiktoken offline, no
`tokenizers` package, a tokenizer.json not on this machine) is said in one line on stderr and
the output falls back to ids.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

from cli.checkpoint import Unavailable, checkpoint_tokenizer
from cli.kv_flags import add_kv_arguments, add_kv_fused_argument, checked_kv_fused, resolve_kv_fused
from cli.self_opt_flags import add_self_opt_arguments
from dba.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="v29 .pt, .safetensors export, or a run directory")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch")
    p.add_argument("--device", default=None,
                   help="torch: cuda|mps|cpu (default: cuda, then mps, then cpu); jax: cpu|gpu|tpu")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="prompt text (needs a checkpoint with a tokenizer)")
    g.add_argument("--prompt-tokens", default=None,
                   help="prompt as token ids separated by commas and/or spaces, e.g. 10,42,7 or '10 42 7'")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--cache-len", type=int, default=None,
                   help="KV cache capacity in tokens, allocated up front (default: prompt + --max-new-tokens)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-id", type=int, default=None, help="stop a row once it emits this id")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (one batch)")
    p.add_argument("--decode-block", "--kv-decode-block", dest="decode_block", type=int, default=1024,
                   help="keys per block when streaming the cache (--kv-decode-block: v29's name)")
    add_kv_fused_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="torch: run each new token through the decode step under torch.compile (CPU, CUDA; "
                        "compiling takes tens of seconds once, then each token is ~3x faster on a CPU; "
                        "eager with a warning where it cannot); the cache is read to its capacity every "
                        "token, so keep --cache-len near prompt + new tokens")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="torch weights dtype")
    add_kv_arguments(p)
    add_self_opt_arguments(p)


def parse_token_ids(text: str, vocab_size: int) -> list[int]:
    """'10,42,7', '10 42 7' or '10, 42 7' -> [10, 42, 7] (each id in the vocabulary)."""
    ids = []
    for part in re.split(r"[\s,]+", text.strip()):
        if part == "":
            continue
        try:
            v = int(part)
        except ValueError:
            raise UserError(f"--prompt-tokens: {part!r} is not an integer token id") from None
        if not 0 <= v < vocab_size:
            raise UserError(f"--prompt-tokens: id {v} is outside the vocabulary [0, {vocab_size})")
        ids.append(v)
    if not ids:
        raise UserError(f"--prompt-tokens {text!r} holds no token ids")
    return ids


def _prompt_ids(args, tok, vocab_size: int) -> list[int]:
    if args.prompt_tokens is not None:
        return parse_token_ids(args.prompt_tokens, vocab_size)
    if isinstance(tok, Unavailable):
        if args.prompt is not None:
            raise UserError(f"--prompt needs the run's tokenizer {tok.label}, which is not available here "
                            f"({tok.why}); give the prompt with --prompt-tokens")
        return [0]
    if args.prompt is not None:
        if tok is None:
            raise UserError("this checkpoint carries no tokenizer: give the prompt with --prompt-tokens")
        ids = tok.encode(args.prompt)
        if not ids:
            raise UserError("--prompt is empty")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise UserError(f"--prompt: the tokenizer gives id {bad[0]}, outside the model's vocabulary "
                            f"[0, {vocab_size})")
        return ids
    return tok.encode("\n") if tok is not None else [0]


def _check_cache_len(args, n_prompt: int) -> None:
    """The prompt and the new tokens must fit the cache the user asked for."""
    if args.cache_len is None:
        return
    need = n_prompt + args.max_new_tokens
    if need > args.cache_len:
        raise UserError(f"--cache-len {args.cache_len}: the prompt ({n_prompt} tokens) plus --max-new-tokens "
                        f"{args.max_new_tokens} needs {need} cache slots")


def _load(args: argparse.Namespace):
    """(model, config, tokenizer, backend functions, device text) for --backend; the functions are
    generate, score_policy and decode_step_seconds of that framework."""
    if args.backend == "torch":
        import torch

        import torch_ref
        from torch_ref.evaluate import decode_step_seconds, score_policy

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        from torch_ref.devices import torch_device

        model = torch_ref.load(args.ckpt, device=torch_device(args.device), dtype=dtype)
        tok = checkpoint_tokenizer(model.load_info.get("metadata", {}), args.ckpt, load="dba sample")
        return model, model.cfg, tok, (torch_ref.generate, score_policy, decode_step_seconds), str(model.device), \
            model.load_info["source"]
    from jax_model.devices import select_platform

    select_platform(args.device)
    import jax

    import jax_model
    from dba.weight_files import read_weights
    from jax_model.evaluate import decode_step_seconds, score_policy

    cfg, state, info = read_weights(args.ckpt)
    model = jax_model.load_canonical(jax_model.DBAModel(cfg), state, info["source"])
    tok = checkpoint_tokenizer(info.get("metadata", {}), args.ckpt, load="dba sample")
    return model, cfg, tok, (jax_model.generate, score_policy, decode_step_seconds), str(jax.devices()[0]), \
        info["source"]


def _step_text(decoder) -> str:
    """What ran each new token with --compile."""
    if decoder is None:
        return ""
    if decoder.mode == "compiled":
        return f"; decode step compiled (torch.compile, {decoder.compile_s:.1f}s first token)"
    return f"; decode step eager ({decoder.note})"


def _self_opt(args, model, cfg, tok, fns, prompt: list[int], policy, source: str, kv_fused: str) -> dict[str, Any]:
    """generate() keyword arguments chosen by --self-opt (policy and decode block, or the online
    planner)."""
    from cli.self_opt_flags import calibration_tokens, decider, options
    from dba.self_opt import OnlinePlanner

    o = options(args)
    if o.mode == "none":
        return {"policy": policy, "decode_block": args.decode_block}
    _, score_policy, step_seconds = fns
    calib = calibration_tokens(args, o, cfg, prompt, tok)
    decide = decider(args, o, cfg, calib,
                     lambda b, n, p: score_policy(model, b, n, p, decode_block=args.decode_block, kv_fused=kv_fused),
                     lambda p, ctx, n, blk: step_seconds(model, p, ctx, n, blk, repeats=o.iters, kv_fused=kv_fused),
                     policy, args.decode_block, source, batch=args.num_samples)
    if o.mode == "online":
        return {"plan_for": OnlinePlanner(decide, o, cfg, args.num_samples, say=lambda t: print(t, file=sys.stderr)),
                "interval": o.interval}
    d = decide(args.cache_len or len(prompt) + args.max_new_tokens)
    print(d.line(), file=sys.stderr)
    return {"policy": d.policy, "decode_block": d.decode_block}


def run(args: argparse.Namespace) -> int:
    from dba.data import decode_ids
    from dba.kvspec import KVPolicy

    policy = KVPolicy.from_flags(vars(args))
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.cache_len is not None and args.cache_len < 1:
        raise UserError(f"--cache-len must be >= 1, got {args.cache_len}")
    if args.self_opt == "online" and args.cache_len is not None:
        raise UserError("--self-opt online grows the cache itself: drop --cache-len")
    if args.compile and args.backend != "torch":
        raise UserError("--compile is for --backend torch (the JAX decode step is always compiled)")
    if args.compile and args.self_opt == "online":
        raise UserError("--compile needs a cache of one shape: not with --self-opt online")
    if args.compile and args.kv_fused not in ("none", "auto"):
        raise UserError(f"--compile runs its own attention over the cache: not with --kv-fused {args.kv_fused}")
    t0 = time.perf_counter()
    from dba.weight_files import resolve_weights_file

    resolve_weights_file(args.ckpt)  # a missing or empty checkpoint is said before a framework starts
    model, cfg, tok, fns, device, source = _load(args)
    kv_fused, fused = resolve_kv_fused("none" if args.compile else args.kv_fused, args.backend,
                                       model.device if args.backend == "torch" else None)
    prompt = _prompt_ids(args, tok, cfg.vocab_size)
    if isinstance(tok, Unavailable):
        tok = None  # said on stderr: token ids in and out
    _check_cache_len(args, len(prompt))
    checked = checked_kv_fused(args.kv_fused, kv_fused, args.backend, model, policy, args.num_samples,
                               args.cache_len or len(prompt) + args.max_new_tokens, args.decode_block)
    if checked != kv_fused:
        kv_fused, fused = checked, f"none ({fused} failed its check)"
    plan = _self_opt(args, model, cfg, tok, fns, prompt, policy, source, kv_fused)
    batch = [prompt] * args.num_samples
    if args.backend == "torch":
        import torch

        batch = torch.tensor(batch, dtype=torch.long, device=model.device)
    decoder, generate = None, fns[0]
    if args.compile:
        from torch_ref.compiled_decode import CompiledDecoder

        decoder = CompiledDecoder(model, plan.get("decode_block", args.decode_block))
        generate = lambda model, prompt, **kw: decoder.generate(prompt, **kw)  # noqa: E731
    out = generate(model, batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, eos_id=args.eos_id, max_len=args.cache_len, kv_fused=kv_fused,
                 **plan)
    import numpy as np

    rows = np.asarray(out.cpu() if args.backend == "torch" else out).tolist()
    elapsed = time.perf_counter() - t0
    for i, row in enumerate(rows):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(decode_ids(tok, row) if tok is not None else ",".join(map(str, row)))
    new = args.max_new_tokens * args.num_samples
    used = plan.get("policy") or policy
    print(f"[{args.backend} on {device}: {new} new tokens in {elapsed:.2f}s incl. load; "
          f"kv cache {used.kind if args.self_opt == 'none' else 'chosen by --self-opt ' + args.self_opt}; "
          f"decode kernel {fused}{_step_text(decoder)}]",
          file=sys.stderr)
    return 0
