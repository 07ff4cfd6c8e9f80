"""`dba sample`: generate from a checkpoint with the torch reference (default) or JAX.

The torch backend never imports JAX, so a laptop with only torch can sample from weights
trained in the cloud. Text in and out when the checkpoint carries a tokenizer (our run
directories and exports do), token ids otherwise (v29 checkpoints).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cli.kv_flags import add_kv_arguments
from dba.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="v29 .pt, .safetensors export, or a run directory")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch")
    p.add_argument("--device", default=None,
                   help="torch: cuda|mps|cpu (default: cuda, then mps, then cpu); jax: cpu|gpu|tpu")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="prompt text (needs a checkpoint with a tokenizer)")
    g.add_argument("--prompt-tokens", default=None, help="prompt as comma-separated token ids, e.g. 10,42,7")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--cache-len", type=int, default=None,
                   help="KV cache capacity in tokens, allocated up front (default: prompt + --max-new-tokens)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-id", type=int, default=None, help="stop a row once it emits this id")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (one batch)")
    p.add_argument("--decode-block", type=int, default=1024, help="keys per block when streaming the cache")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="torch weights dtype")
    add_kv_arguments(p)


def parse_token_ids(text: str, vocab_size: int) -> list[int]:
    ids = []
    for part in text.replace(" ", "").split(","):
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


def _tokenizer(meta: dict):
    raw = (meta or {}).get("tokenizer")
    if not raw:
        return None
    from dba.data import tokenizer_from_dict

    try:
        return tokenizer_from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the checkpoint's tokenizer record is unreadable: {e}", 1) from None


def _prompt_ids(args, tok, vocab_size: int) -> list[int]:
    if args.prompt_tokens is not None:
        return parse_token_ids(args.prompt_tokens, vocab_size)
    if args.prompt is not None:
        if tok is None:
            raise UserError("this checkpoint carries no tokenizer: give the prompt with --prompt-tokens")
        ids = tok.encode(args.prompt)
        if not ids:
            raise UserError("--prompt is empty")
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


def torch_device(name: str | None):
    import torch

    from torch_ref.model import default_device

    if name is None:
        return default_device()
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps requested but MPS is not available on this machine", 1)
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available", 1)
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UserError(f"--device {name!r}: choose cuda, mps or cpu for the torch backend")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    from dba.kvspec import KVPolicy

    policy = KVPolicy.from_flags(vars(args))
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.cache_len is not None and args.cache_len < 1:
        raise UserError(f"--cache-len must be >= 1, got {args.cache_len}")
    t0 = time.perf_counter()
    if args.backend == "torch":
        import torch

        import torch_ref

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        model = torch_ref.load(args.ckpt, device=torch_device(args.device), dtype=dtype)
        cfg, meta = model.cfg, model.load_info.get("metadata", {})
        tok = _tokenizer(meta)
        prompt = _prompt_ids(args, tok, cfg.vocab_size)
        _check_cache_len(args, len(prompt))
        batch = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=model.device)
        out = torch_ref.generate(model, batch, max_new_tokens=args.max_new_tokens, policy=policy,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 seed=args.seed, eos_id=args.eos_id, decode_block=args.decode_block,
                                 max_len=args.cache_len)
        rows = out.cpu().tolist()
        device = str(model.device)
    else:
        import os

        if args.device is not None:
            plat = {"cuda": "gpu"}.get(args.device, args.device)
            if plat not in ("cpu", "gpu", "tpu"):
                raise UserError(f"--device {args.device!r}: choose cpu, gpu or tpu for the jax backend "
                                "(mps is served by --backend torch)")
            os.environ["JAX_PLATFORMS"] = plat
        import numpy as np

        import jax_model
        from dba.weight_files import read_weights

        cfg, state, info = read_weights(args.ckpt)
        model = jax_model.load_canonical(jax_model.DBAModel(cfg), state, info["source"])
        tok = _tokenizer(info.get("metadata", {}))
        prompt = _prompt_ids(args, tok, cfg.vocab_size)
        _check_cache_len(args, len(prompt))
        batch = np.asarray([prompt] * args.num_samples, dtype=np.int32)
        out = jax_model.generate(model, batch, max_new_tokens=args.max_new_tokens, policy=policy,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                 seed=args.seed, eos_id=args.eos_id, decode_block=args.decode_block,
                                 max_len=args.cache_len)
        rows = np.asarray(out).tolist()
        import jax

        device = str(jax.devices()[0])
    elapsed = time.perf_counter() - t0
    for i, row in enumerate(rows):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(tok.decode(row) if tok is not None else ",".join(map(str, row)))
    new = args.max_new_tokens * args.num_samples
    print(f"[{args.backend} on {device}: {new} new tokens in {elapsed:.2f}s incl. load; "
          f"kv cache {policy.kind}]", file=sys.stderr)
    return 0
