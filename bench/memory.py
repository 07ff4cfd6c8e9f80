"""Peak host memory of training and of cached decode, JAX and the torch reference, vs `kv_bytes`.

Every case runs in a fresh process of its own (one backend, one config). What is measured:

- **RSS** comes from /proc/self/status. The peak of a phase is VmHWM after resetting it at the
  phase start (`5 > /proc/self/clear_refs`), so compilation, prefill and earlier phases do not
  count; *growth* = peak - RSS at the phase start. Anything resident before the phase (weights,
  the filled cache, the runtime) is not growth.
- **decode** (batch 1, context `ctx`, cache kind): the cache is preallocated for ctx + 2 x
  `--new-tokens` and filled by a chunked prefill; one untimed round of `--new-tokens` greedy
  tokens compiles the decode; the measured phase is the second round. Reported: `kv_bytes` (the
  analytic SPEC §6 formula), the bytes the cache really allocates, and the decode's memory =
  cache bytes + RSS growth during the phase, as a ratio to `kv_bytes`. For JAX also XLA's own
  accounting of the compiled token loop: its temporaries and whether the cache is aliased to the
  output (updated in place, not copied); accounted decode memory = cache + temporaries +
  non-aliased outputs. The target: a 32k q4_0 decode within kv_bytes + 10%.
- **train** (config, batch, Lion): parameters and optimizer state (bytes of their arrays), JAX's
  compiled step temporaries, RSS after the first (compiling) step, and the peak over `--steps`
  further steps. The JAX side runs with the host malloc tuning `dba train` applies
  (`--malloc-tuning`), which keeps freed memory resident by design.

    python -m bench.memory                       # config A: train, and decode at 32k (q4_0, fp16)
    dba bench memory --parts decode --contexts 32768,131072 --kinds q4_0 --backends jax
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import (CONFIGS, bench_main, bench_optim, in_fresh_process, machine, named_config, nonneg_int,
                          positive_int, print_table, write_json)
from dba.config import ModelConfig
from dba.kvspec import KVPolicy, kv_bytes
from dba.optimizers import OPTIMIZERS
from dba.resources import host_rss_bytes, reset_peak_rss
from dba.units import human_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=tuple(CONFIGS), default="A")
    p.add_argument("--no-null-attn", action="store_true", help="config without null attention")
    p.add_argument("--parts", default="train,decode", help="which measurements: train, decode")
    p.add_argument("--backends", default="jax,torch")
    p.add_argument("--contexts", default="32768", help="decode contexts, comma separated")
    p.add_argument("--kinds", default="q4_0,fp16", help="decode cache kinds, comma separated")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--prefill-chunk", type=positive_int, default=2048)
    p.add_argument("--decode-block", type=positive_int, default=1024)
    p.add_argument("--residual", type=nonneg_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--steps", type=positive_int, default=3, help="measured train steps (after a compiling one)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="lion")
    p.add_argument("--malloc-tuning", choices=("jax", "all", "none"), default="jax",
                   help="which backends' *training* runs with train.step.tune_host_malloc (as dba train)")
    p.add_argument("--json", default=None, help="also write the results here")


# ---- resident memory -------------------------------------------------------------------------
def rss() -> int | None:
    return host_rss_bytes()[0]


class PeakRSS:
    """Peak RSS over a `with` block and its growth over the RSS at entry (None off Linux)."""

    def __enter__(self):
        self.resettable = reset_peak_rss()  # VmHWM back to the current RSS (Linux >= 4.0)
        self.start = rss()
        return self

    def __exit__(self, *exc):
        self.peak = host_rss_bytes()[1] if self.resettable else None
        self.growth = None if self.peak is None or self.start is None else max(0, self.peak - self.start)


def _ratio(n: int | None, d: int) -> float | None:
    return None if n is None else n / d


# ---- decode --------------------------------------------------------------------------------
def decode_jax(cfg: ModelConfig, policy: KVPolicy, ctx: int, args) -> dict:
    import jax
    import jax.numpy as jnp

    import jax_model
    from jax_model import kvcache as kvc
    from jax_model.decode import prefill
    from jax_model.sampling import _token_loop

    new, chunk, blk = args.new_tokens, args.prefill_chunk, args.decode_block
    model = jax_model.DBAModel(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, ctx)), jnp.int32)
    cache = kvc.init_cache(cfg, policy, 1, ctx + 2 * new)
    cache_bytes = kvc.nbytes(cache)
    for s in range(0, ctx, chunk):
        logits, cache = prefill(model, cache, tokens[:, s:s + chunk], fresh=s == 0, decode_block=blk, last_only=True)
    last = logits[:, -1]
    key = jax.random.PRNGKey(0)
    loop = dict(n_new=new, temperature=0.0, top_k=None, top_p=None, eos_id=None, decode_block=blk)
    state = (jnp.zeros((1,), bool), jnp.int32(0))  # no row done, the first token's key
    stats = _token_loop.lower(model, cache, last, key, *state, **loop).compile().memory_analysis()
    _, cache, _, _ = jax.block_until_ready(_token_loop(model, cache, last, key, *state, **loop))  # compiles
    t0 = time.perf_counter()
    with PeakRSS() as m:
        _, cache, _, _ = jax.block_until_ready(_token_loop(model, cache, last, key, *state, **loop))
    dt = time.perf_counter() - t0
    temp, alias = int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes)
    extra_out = int(stats.output_size_in_bytes) - alias
    return {"cache_bytes": cache_bytes, "rss_start": m.start, "rss_peak": m.peak, "rss_growth": m.growth,
            "xla_temp_bytes": temp, "xla_alias_bytes": alias, "xla_extra_output_bytes": extra_out,
            "cache_in_place": alias >= cache_bytes, "accounted_bytes": cache_bytes + temp + extra_out,
            "decode_s": dt}


def decode_torch(cfg: ModelConfig, policy: KVPolicy, ctx: int, args) -> dict:
    import torch

    import torch_ref
    from torch_ref import kvcache as kvc
    from torch_ref.decode import prefill
    from torch_ref.sampling import sample_next

    new, chunk, blk = args.new_tokens, args.prefill_chunk, args.decode_block
    model = torch_ref.DBAModel(cfg).eval()
    tokens = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, ctx)))
    cache = kvc.init_cache(cfg, policy, 1, ctx + 2 * new)
    cache_bytes = kvc.nbytes(cache)

    def decode(logits):
        for _ in range(new):
            tok = sample_next(logits, None, 0.0, None, None)
            logits = model.forward_cached(tok[:, None], cache, fresh=False, decode_block=blk)[0][:, 0]
        return logits

    with torch.no_grad():
        for s in range(0, ctx, chunk):
            logits, _ = prefill(model, cache, tokens[:, s:s + chunk], fresh=s == 0, decode_block=blk,
                                last_only=True)
        logits = decode(logits[:, -1])  # the same warm-up round as JAX's
        t0 = time.perf_counter()
        with PeakRSS() as m:
            decode(logits)
        dt = time.perf_counter() - t0
    return {"cache_bytes": cache_bytes, "rss_start": m.start, "rss_peak": m.peak, "rss_growth": m.growth,
            "decode_s": dt}


# ---- training ------------------------------------------------------------------------------
def _batches(cfg: ModelConfig, args) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        tok = rng.integers(0, cfg.vocab_size, (1, args.batch_size, args.seq_len + 1)).astype(np.int32)
        out.append((tok[..., :-1].copy(), tok[..., 1:].copy()))
    return out


def train_jax(cfg: ModelConfig, args) -> dict:
    import jax

    from jax_model import DBAModel
    from train.optim import build_optimizer
    from train.step import Stepper

    base = rss()
    stepper = Stepper(DBAModel(cfg), build_optimizer(bench_optim(args), 10_000))
    nbytes = lambda tree: int(sum(a.nbytes for a in jax.tree.leaves(tree)))  # noqa: E731
    batches = [(jax.device_put(x), jax.device_put(y)) for x, y in _batches(cfg, args)]
    stats = stepper.compiled(*batches[0]).memory_analysis()
    jax.block_until_ready(stepper.train_step(*batches[0], 0))
    after_first = rss()
    with PeakRSS() as m:
        for i in range(args.steps):
            jax.block_until_ready(stepper.train_step(*batches[(i + 1) % 2], i + 1))
    return {"params_bytes": nbytes(stepper.params), "opt_state_bytes": nbytes(stepper.opt_state),
            "xla_temp_bytes": None if stats is None else int(stats.temp_size_in_bytes),
            "rss_base": base, "rss_after_first_step": after_first, "rss_peak": m.peak, "rss_growth": m.growth}


def train_torch(cfg: ModelConfig, args) -> dict:
    import torch

    import torch_ref
    from torch_train.step import TorchStepper
    from train.config import PrecisionConfig

    base = rss()
    torch.manual_seed(0)
    stepper = TorchStepper(torch_ref.DBAModel(cfg), bench_optim(args), PrecisionConfig(), total_steps=10_000)
    batches = [(stepper.put_batch(x), stepper.put_batch(y)) for x, y in _batches(cfg, args)]
    stepper.fetch(stepper.train_step(*batches[0], 0))
    after_first = rss()
    with PeakRSS() as m:
        for i in range(args.steps):
            stepper.fetch(stepper.train_step(*batches[(i + 1) % 2], i + 1))
    params = sum(p.numel() * p.element_size() for p in stepper.model.parameters())
    opt = sum(t.numel() * t.element_size() for st in stepper.opt.state.values() for t in st.values()
              if torch.is_tensor(t))
    return {"params_bytes": int(params), "opt_state_bytes": int(opt), "xla_temp_bytes": None,
            "rss_base": base, "rss_after_first_step": after_first, "rss_peak": m.peak, "rss_growth": m.growth}


def _child(part: str, backend: str, cfg: ModelConfig, args, policy=None, ctx=None) -> dict:
    """One measurement in a fresh process."""
    if part == "train":
        if args.malloc_tuning in ("all", backend):
            from train.step import tune_host_malloc

            tune_host_malloc()
        return (train_jax if backend == "jax" else train_torch)(cfg, args)
    return (decode_jax if backend == "jax" else decode_torch)(cfg, policy, ctx, args)


def _fmt(n: int | None) -> str:
    return "n/a" if n is None else human_bytes(n)


def run(args: argparse.Namespace) -> int:
    cfg = named_config(args.config, null_attn=not args.no_null_attn)
    parts = [p for p in args.parts.split(",") if p]
    backends = [b for b in args.backends.split(",") if b]
    bad = sorted(set(parts) - {"train", "decode"}) + sorted(set(backends) - {"jax", "torch"})
    if bad:
        raise SystemExit(f"unknown part/backend: {', '.join(bad)}")
    out: dict = {"bench": "memory", "config": cfg.to_dict(), "machine": machine(), "train": [], "decode": []}

    if "train" in parts:
        rows = []
        for backend in backends:
            r = {"backend": backend, **in_fresh_process(_child, "train", backend, cfg, args)}
            out["train"].append(r)
            rows.append([backend, _fmt(r["params_bytes"]), _fmt(r["opt_state_bytes"]), _fmt(r["xla_temp_bytes"]),
                         _fmt(r["rss_base"]), _fmt(r["rss_after_first_step"]), _fmt(r["rss_peak"]),
                         _fmt(r["rss_growth"])])
            print(f"  done train {backend}", flush=True)
        print_table(f"Training memory, config {args.config}, batch {args.batch_size} x seq {args.seq_len}, "
                    f"{args.optimizer}, fp32 (RSS peak over {args.steps} steps after the first)",
                    ["backend", "params", "opt state", "XLA temp", "RSS at start", "RSS after step 1",
                     "RSS peak", "growth in steps"], rows)

    if "decode" in parts:
        rows = []
        for ctx in [int(c) for c in args.contexts.split(",") if c]:
            for kind in [k for k in args.kinds.split(",") if k]:
                policy = KVPolicy(kind=kind, residual=args.residual)
                kvb = kv_bytes(cfg, ctx + 2 * args.new_tokens, 1, policy)["total_bytes"]
                for backend in backends:
                    r = in_fresh_process(_child, "decode", backend, cfg, args, policy=policy, ctx=ctx)
                    measured = None if r["rss_growth"] is None else r["cache_bytes"] + r["rss_growth"]
                    res = {"backend": backend, "ctx": ctx, "kind": kind, "kv_bytes": kvb, **r,
                           "decode_bytes_measured": measured, "ratio_measured": _ratio(measured, kvb),
                           "ratio_accounted": _ratio(r.get("accounted_bytes"), kvb)}
                    out["decode"].append(res)
                    fmt_ratio = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
                    rows.append([ctx, kind, backend, _fmt(kvb), _fmt(r["cache_bytes"]), _fmt(r["rss_growth"]),
                                 fmt_ratio(res["ratio_measured"]), _fmt(r.get("xla_temp_bytes")),
                                 {True: "yes", False: "NO"}.get(r.get("cache_in_place"), "n/a"),
                                 fmt_ratio(res["ratio_accounted"])])
                    print(f"  done decode ctx={ctx} kind={kind} {backend}", flush=True)
        print_table(f"Decode memory, config {args.config} ({'no ' if args.no_null_attn else ''}null attn), batch 1, "
                    f"{args.new_tokens} tokens after a {args.new_tokens}-token warm-up round, decode block "
                    f"{args.decode_block}; ratio = (cache + growth) / kv_bytes",
                    ["ctx", "kind", "backend", "kv_bytes", "cache allocated", "RSS growth", "ratio",
                     "XLA temp", "in place", "XLA ratio"], rows)
    write_json(args.json, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.memory", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
