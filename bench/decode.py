"""Decode throughput per cache kind and context: JAX and the torch reference side by side.

For each context L the cache is filled by a chunked prefill (first chunk through the empty
cache, later chunks appended then attended, SPEC §5), then `--new-tokens` tokens are decoded
greedily. Reported: prefill tokens/s, decode tokens/s, the bytes of cache the decode step reads
per token (the whole cache, once), the effective bandwidth that implies, and the cache's size.
Compile time is excluded from throughput (measured separately, on a warm-up call).

    python -m bench.decode                   # config A + null attention, contexts 1k/8k/32k
    dba bench decode --contexts 2048 --kinds q4_0,fp16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import machine, named_config, print_table, write_json
from dba.config import ModelConfig
from dba.kvspec import KVPolicy, human_bytes, kv_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=("A", "seed"), default="A")
    p.add_argument("--no-null-attn", action="store_true", help="config without null attention")
    p.add_argument("--contexts", default="1024,8192,32768")
    p.add_argument("--kinds", default="fp16,q8_0,q4_0,nf4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--decode-block", type=int, default=1024)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--backends", default="jax,torch")
    p.add_argument("--json", default=None, help="also write the results here")


def _policy(kind: str, residual: int) -> KVPolicy:
    return KVPolicy(kind=kind, residual=residual)


def bench_jax(cfg: ModelConfig, policy: KVPolicy, ctx: int, new: int, chunk: int, block: int) -> dict:
    import jax
    import jax.numpy as jnp

    import jax_model
    from jax_model import kvcache as kvc
    from jax_model.decode import prefill
    from jax_model.sampling import _token_loop

    model = jax_model.DBAModel(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, ctx)), jnp.int32)

    def fill():
        cache = kvc.init_cache(cfg, policy, 1, ctx + new)
        logits = None
        for s in range(0, ctx, chunk):
            logits, cache = prefill(model, cache, tokens[:, s:s + chunk], fresh=s == 0, decode_block=block,
                                    last_only=True)
        return jax.block_until_ready((logits, cache))

    def decode(logits, cache):
        out = _token_loop(model, cache, logits[:, -1], jax.random.PRNGKey(0), n_new=new, temperature=0.0,
                          top_k=None, top_p=None, eos_id=None, decode_block=block)
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    logits, cache = fill()
    decode(logits, cache)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, cache = fill()
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode(logits, cache)
    t_decode = time.perf_counter() - t0
    return {"prefill_s": t_prefill, "decode_s": t_decode, "warmup_s": compile_s, "cache_bytes": kvc.nbytes(cache)}


def bench_torch(cfg: ModelConfig, policy: KVPolicy, ctx: int, new: int, chunk: int, block: int) -> dict:
    import torch

    import torch_ref
    from torch_ref import kvcache as kvc
    from torch_ref.decode import forward_cached
    from torch_ref.sampling import sample_next

    model = torch_ref.DBAModel(cfg).eval()
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, ctx)))
    with torch.no_grad():
        t0 = time.perf_counter()
        cache = kvc.init_cache(cfg, policy, 1, ctx + new)
        for s in range(0, ctx, chunk):
            logits = forward_cached(model, cache, tokens[:, s:s + chunk], fresh=s == 0, decode_block=block,
                                        last_only=True)
        t_prefill = time.perf_counter() - t0
        logits = logits[:, -1]
        t0 = time.perf_counter()
        for _ in range(new):
            tok = sample_next(logits, None, 0.0, None, None)
            logits = forward_cached(model, cache, tok[:, None], fresh=False, decode_block=block)[:, 0]
        t_decode = time.perf_counter() - t0
    return {"prefill_s": t_prefill, "decode_s": t_decode, "warmup_s": 0.0, "cache_bytes": kvc.nbytes(cache)}


def run(args: argparse.Namespace) -> int:
    cfg = named_config(args.config, null_attn=not args.no_null_attn)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    kinds = [k for k in args.kinds.split(",") if k]
    backends = [b for b in args.backends.split(",") if b]
    runners = {"jax": bench_jax, "torch": bench_torch}
    rows, results = [], []
    for ctx in contexts:
        for kind in kinds:
            policy = _policy(kind, args.residual)
            read = kv_bytes(cfg, ctx, 1, policy)["total_bytes"]  # the decode step reads the whole cache
            for backend in backends:
                r = runners[backend](cfg, policy, ctx, args.new_tokens, args.prefill_chunk, args.decode_block)
                dec_tps = args.new_tokens / r["decode_s"]
                total_tps = args.new_tokens / (r["prefill_s"] + r["decode_s"])
                res = {"backend": backend, "ctx": ctx, "kind": kind, **r, "prefill_tok_s": ctx / r["prefill_s"],
                       "decode_tok_s": dec_tps, "tok_s_incl_prefill": total_tps, "bytes_read_per_token": read,
                       "effective_GB_s": read * dec_tps / 1e9}
                results.append(res)
                rows.append([ctx, kind, backend, f"{res['prefill_tok_s']:,.0f}", f"{dec_tps:,.1f}",
                             f"{total_tps:,.1f}", human_bytes(read), f"{res['effective_GB_s']:.2f}",
                             human_bytes(r["cache_bytes"]), f"{r['warmup_s']:.1f}"])
                print(f"  done ctx={ctx} kind={kind} backend={backend}: decode {dec_tps:,.1f} tok/s", flush=True)
    title = (f"Decode, config {args.config} ({'no ' if args.no_null_attn else ''}null attn), batch 1, "
             f"{args.new_tokens} new tokens, prefill chunk {args.prefill_chunk}, decode block {args.decode_block}")
    print_table(title, ["ctx", "kind", "backend", "prefill tok/s", "decode tok/s", "tok/s incl. prefill",
                        "cache read/token", "eff. GB/s", "cache size", "warm-up s"], rows)
    write_json(args.json, {"bench": "decode", "config": cfg.to_dict(), "machine": machine(), "results": results})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.decode", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
