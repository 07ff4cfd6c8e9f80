"""Decode throughput per cache kind and context: JAX and the torch reference side by side.

For each context L the cache is filled by a prefill (the first `--prefill-chunk` tokens through
the empty cache, later chunks appended then attended, SPEC §5), then `--new-tokens` tokens are
decoded greedily. Reported per (context, kind, backend), the median of `--repeats` runs:
prefill tokens/s, decode tokens/s after the prefill, tokens/s counting the prefill
(new tokens / (prefill + decode time)), the bytes of cache one decode step reads (the whole
cache of L tokens, `kv_bytes`: every block is dequantized once per token) and the bandwidth
that implies (bytes x decode tokens/s). Compilation (JAX) and the first-call warm-up (torch)
are excluded from throughput and reported separately.

Each backend runs in a fresh process of its own (XLA's and torch's thread pools would otherwise
compete); JAX with the host malloc tuning `dba train` applies (`--malloc-tuning`; without it a
2048-token prefill page-faults its score blocks in again on every call).

    python -m bench.decode                   # config A + null attention, contexts 1k/8k/32k
    python -m bench.decode --quick           # 1k and 8k, q4_0 and fp16, one repeat
    dba bench decode --contexts 2048 --kinds q4_0,fp16 --new-tokens 64   # the v29 comparison
    dba bench decode --contexts 128000 --kinds q4_0 --backends jax       # when memory allows
    dba bench decode --kv-fused none,pallas,triton1pass,triton2pass       # the fused kernels (GPU)

`--kv-fused` lists decode kernels (dba/fused.py) to time beside each other; a kernel runs only on
its own backend (pallas: jax; triton*: torch). On a CPU an explicit kernel runs interpreted,
which checks it end to end but says nothing about its speed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.common import (
    DEVICE_HELP,
    DEVICES,
    bench_main,
    best_per_call,
    in_fresh_process,
    machine,
    named_config,
    nonneg_int,
    positive_int,
    print_table,
    torch_device,
    torch_sync,
    write_json,
)
from dba.config import ModelConfig
from dba.errors import UserError
from dba.kvspec import KVPolicy, kv_bytes
from dba.units import human_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=("A", "seed"), default="A")
    p.add_argument("--no-null-attn", action="store_true", help="config without null attention")
    p.add_argument("--contexts", default="1024,8192,32768", help="prompt lengths, comma separated")
    p.add_argument("--kinds", default="fp16,q8_0,q4_0,nf4")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--prefill-chunk", type=positive_int, default=2048)
    p.add_argument("--decode-block", type=positive_int, default=1024,
                   help="cache positions per block of cached attention (>= context + new tokens: one block, no loop)")
    p.add_argument("--prefill-block", type=nonneg_int, default=0,
                   help="the same for the prefill's later chunks (0: --decode-block)")
    p.add_argument("--residual", type=nonneg_int, default=128)
    p.add_argument("--backends", default="jax,torch",
                   help="comma separated: jax, torch (eager), torch-compile (torch_ref.compiled_decode: the decode "
                        "step under torch.compile; its compile time is the warm-up)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--quick", action="store_true", help="contexts 1024,8192, kinds q4_0,fp16, 1 repeat")
    p.add_argument("--malloc-tuning", choices=("jax", "all", "none"), default="jax",
                   help="which backends run with train.step.tune_host_malloc")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    p.add_argument("--kv-fused", default="none",
                   help="decode kernels to time, comma separated: none, auto, pallas (jax), triton, triton1pass, "
                        "triton2pass (torch); each runs on its own backend")
    p.add_argument("--json", default=None, help="also write the results here")


def bench_jax(cfg: ModelConfig, policy: KVPolicy, ctx: int, args, fused: str = "none") -> dict:
    import jax
    import jax.numpy as jnp

    import jax_model
    from jax_model import kvcache as kvc
    from jax_model.decode import prefill
    from jax_model.sampling import _token_loop

    new, chunk, block = args.new_tokens, args.prefill_chunk, args.decode_block
    dt = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    model = jax_model.DBAModel(cfg, dtype=dt, param_dtype=dt)
    from jax_model.pallas_decode import cache_attention, resolve_kv_fused

    mode, kernel = resolve_kv_fused(fused)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, ctx)), jnp.int32)

    def fill():
        cache = kvc.init_cache(cfg, policy, 1, ctx + new)
        for s in range(0, ctx, chunk):
            logits, cache = prefill(model, cache, tokens[:, s:s + chunk], fresh=s == 0,
                                    decode_block=args.prefill_block or block, last_only=True, kv_fused=mode)
        return jax.block_until_ready((logits, cache))

    def decode(logits, cache):  # consumes the cache (donated): every run refills it
        out, _, _, _ = _token_loop(model, cache, logits[:, -1], jax.random.PRNGKey(0), jnp.zeros((1,), bool),
                                   jnp.int32(0), n_new=new, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                                   decode_block=block, cache_attend=cache_attention(mode))
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    logits, cache = fill()
    cache_bytes = kvc.nbytes(cache)
    decode(logits, cache)
    warm = time.perf_counter() - t0
    t_prefill, t_decode = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        logits, cache = fill()
        t1 = time.perf_counter()
        decode(logits, cache)
        t_prefill.append(t1 - t0)
        t_decode.append(time.perf_counter() - t1)
    return {"prefill_s": t_prefill, "decode_s": t_decode, "warmup_s": warm, "cache_bytes": cache_bytes,
            "kernel": kernel}


def bench_torch(cfg: ModelConfig, policy: KVPolicy, ctx: int, args, fused: str = "none",
                compiled: bool = False) -> dict:
    import torch

    import torch_ref
    from torch_ref import kvcache as kvc
    from torch_ref.decode import prefill
    from torch_ref.sampling import sample_next

    new, chunk, block = args.new_tokens, args.prefill_chunk, args.decode_block
    device = torch_device(args.device)
    model = torch_ref.DBAModel(cfg).eval().to(device=device, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    from torch_ref.triton_decode import cache_attention, resolve_kv_fused

    mode, kernel = resolve_kv_fused(fused, device)
    attend = cache_attention(mode)
    decoder = None
    if compiled:
        from torch_ref.compiled_decode import CompiledDecoder

        decoder = CompiledDecoder(model, block)
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, ctx))).to(device)

    def run() -> tuple[float, float, int]:
        torch_sync(device)
        t0 = time.perf_counter()
        cache = kvc.init_cache(cfg, policy, 1, ctx + new, device=device)
        for s in range(0, ctx, chunk):
            logits, cache = prefill(model, cache, tokens[:, s:s + chunk], fresh=s == 0,
                                    decode_block=args.prefill_block or block, last_only=True, kv_fused=mode)
        logits = logits[:, -1]
        torch_sync(device)
        t1 = time.perf_counter()
        for _ in range(new):
            tok = sample_next(logits, None, 0.0, None, None)
            if decoder is not None:
                logits, cache = decoder.step(cache, tok)
                continue
            logits, cache = model.forward_cached(tok[:, None], cache, fresh=False, decode_block=block,
                                                 cache_attend=attend)
            logits = logits[:, 0]
        torch_sync(device)
        return t1 - t0, time.perf_counter() - t1, kvc.nbytes(cache)

    with torch.no_grad():
        t0 = time.perf_counter()
        _, _, cache_bytes = run()  # allocator / oneDNN warm-up, the analogue of compiling
        warm = time.perf_counter() - t0
        times = [run()[:2] for _ in range(args.repeats)]
    if decoder is not None:
        kernel = "compiled" if decoder.mode == "compiled" else f"eager ({decoder.note})"
    return {"prefill_s": [t[0] for t in times], "decode_s": [t[1] for t in times], "warmup_s": warm,
            "cache_bytes": cache_bytes, "device": device, "kernel": kernel}


def copy_bandwidth(backend: str, args) -> float:
    """Device memory bandwidth in GB/s, bytes read + written by an elementwise pass over 1 GiB
    (256 MiB on a CPU), best of 5: the yardstick 'time to read the cache once' is measured with."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        cpu = jax.default_backend() == "cpu"
        x = jnp.ones(((64 if cpu else 256) * 2**20,), jnp.float32)
        f = jax.jit(lambda a: a * 1.5 + 1.0)
        run, sync = (lambda: f(x)), (lambda y: y.block_until_ready())
    else:
        import torch

        device = torch_device(args.device)
        cpu = device == "cpu"
        x = torch.ones(((64 if cpu else 256) * 2**20,), dtype=torch.float32, device=device)
        out = torch.empty_like(x)  # preallocated: one read and one write per element
        run, sync = (lambda: torch.mul(x, 1.5, out=out)), (lambda y: torch_sync(device))
    sync(run())
    return 2 * x.nbytes / best_per_call(run, sync, 1 if cpu else 10, 5) / 1e9


def _child(backend: str, cfg: ModelConfig, cases: list, args) -> dict:
    """Every (ctx, kind, kernel) case of one backend, in a fresh process, and its memory bandwidth."""
    if args.malloc_tuning in ("all", backend):
        from train.step import tune_host_malloc

        tune_host_malloc()  # before JAX/torch start their thread pools
    out = []
    for ctx, kind, fused in cases:
        policy = KVPolicy(kind=kind, residual=args.residual)
        if backend == "jax":
            r = bench_jax(cfg, policy, ctx, args, fused)
        else:
            r = bench_torch(cfg, policy, ctx, args, fused, compiled=backend == "torch-compile")
        out.append({"ctx": ctx, "kind": kind, "fused": fused, **r})
        print(f"  {backend} ctx={ctx} kind={kind} kernel={r['kernel']}: decode "
              f"{args.new_tokens / statistics.median(r['decode_s']):,.1f} tok/s", flush=True)
    bw = copy_bandwidth(backend, args)
    print(f"  {backend} memory bandwidth (read + write): {bw:,.1f} GB/s", flush=True)
    return {"cases": out, "bandwidth_GB_s": bw}


def run(args: argparse.Namespace) -> int:

    if args.quick:
        args.contexts, args.kinds, args.repeats = "1024,8192", "q4_0,fp16", 1
    cfg = named_config(args.config, null_attn=not args.no_null_attn)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    kinds = [k for k in args.kinds.split(",") if k]
    backends = [b for b in args.backends.split(",") if b]
    if sorted(set(backends) - {"jax", "torch", "torch-compile"}):
        raise UserError(f"--backends: unknown backend(s) in {args.backends!r} (choose from jax, torch, torch-compile)")
    fused = _kernels(args.kv_fused, backends)
    cases = {b: [(ctx, kind, f) for ctx in contexts for kind in kinds for f in fused[b]] for b in backends}
    by_backend = {}
    for backend in backends:
        by_backend[backend] = in_fresh_process(_child, backend, cfg, cases[backend], args)
    new = args.new_tokens
    rows, results = [], []
    for ctx in contexts:
        for kind in kinds:
            read = kv_bytes(cfg, ctx, 1, KVPolicy(kind=kind, residual=args.residual))["total_bytes"]
            for backend in backends:
                for r in by_backend[backend]["cases"]:
                    if (r["ctx"], r["kind"]) == (ctx, kind):
                        _row(rows, results, ctx, kind, backend, r, read, by_backend[backend]["bandwidth_GB_s"], new)
    title = (f"Decode, config {args.config} ({'no ' if args.no_null_attn else ''}null attn), batch 1, "
             f"{new} new tokens, prefill chunk {args.prefill_chunk}, decode block {args.decode_block}"
             + (f", prefill block {args.prefill_block}" if args.prefill_block else "") + ", "
             f"median of {args.repeats}")
    print_table(title, ["ctx", "kind", "backend", "kernel", "prefill tok/s", "decode tok/s", "tok/s incl. prefill",
                        "cache read/token", "eff. GB/s", "ms/token", "1 read ms", "x 1 read", "cache size",
                        "warm-up s"], rows)
    print("1 read ms: the cache's bytes over the measured memory bandwidth ("
          + ", ".join(f"{b} {by_backend[b]['bandwidth_GB_s']:,.0f} GB/s" for b in backends)
          + "); x 1 read: decode ms/token over that; kernel: --kv-fused's choice (interpreted = on a CPU, "
            "a correctness run, not a timing)")
    write_json(args.json, {"bench": "decode", "config": cfg.to_dict(), "machine": machine(),
                           "new_tokens": new, "prefill_chunk": args.prefill_chunk,
                           "decode_block": args.decode_block, "malloc_tuning": args.malloc_tuning,
                           "dtype": args.dtype,
                           "results": results})
    return 0


def _kernels(text: str, backends: list[str]) -> dict[str, list[str]]:
    """The --kv-fused choices each backend runs (a kernel only on its own backend; the compiled
    torch step has its own attention, so "none" only)."""
    from dba.fused import resolve_fused

    choices = [c for c in text.split(",") if c]
    out: dict[str, list[str]] = {b: [] for b in backends}
    for c in choices:
        for b in backends:
            if b == "torch-compile" and c != "none":
                continue
            try:
                resolve_fused(c, b, False)
            except UserError as e:
                if "backend's kernel" not in str(e):
                    raise
                continue
            out[b].append(c)
    if not any(out.values()):
        raise UserError(f"--kv-fused {text!r}: no kernel for --backends {','.join(backends)}")
    return out


def _row(rows: list, results: list, ctx: int, kind: str, backend: str, r: dict, read: int, bw: float,
         new: int) -> None:
    """One (context, kind, backend, kernel) result: its record and its table row."""
    pre, dec = statistics.median(r["prefill_s"]), statistics.median(r["decode_s"])
    one_read_s = read / (bw * 1e9)
    res = {"backend": backend, **r, "prefill_s_median": pre, "decode_s_median": dec,
           "prefill_tok_s": ctx / pre, "decode_tok_s": new / dec, "tok_s_incl_prefill": new / (pre + dec),
           "bytes_read_per_token": read, "effective_GB_s": read * new / dec / 1e9,
           "bandwidth_GB_s": bw, "one_cache_read_s": one_read_s,
           "decode_step_over_one_read": dec / new / one_read_s}
    results.append(res)
    rows.append([ctx, kind, backend, r["kernel"], f"{res['prefill_tok_s']:,.0f}", f"{res['decode_tok_s']:,.1f}",
                 f"{res['tok_s_incl_prefill']:,.1f}", human_bytes(read), f"{res['effective_GB_s']:.2f}",
                 f"{1e3 * dec / new:.3f}", f"{1e3 * one_read_s:.3f}",
                 f"{res['decode_step_over_one_read']:.1f}", human_bytes(r["cache_bytes"]),
                 f"{r['warmup_s']:.1f}"])


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.decode", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
