"""Train-step throughput and MFU: the JAX step `dba train` runs, and the torch reference step.

JAX: `train.step.Stepper` with the optax chain from `train.optim.build_optimizer`, exactly what
`dba train` builds (donated state, one jitted step, grad clip, injected lr). Torch:
`torch_train.step.TorchStepper`, the step `dba train --backend torch` runs, on the same config,
optimizer and batches. Compile/warm-up
time is reported separately and excluded from throughput. Each backend runs in its own fresh
process (XLA's and torch's thread pools would otherwise compete), the JAX one with the host
malloc tuning `dba train` applies (`train.step.tune_host_malloc`; `--malloc-tuning`).

MFU is achieved FLOP/s over a matmul peak measured at the start of the run on this machine
and again after the step (a large square matmul, best of several; the better of the two, so a
neighbour's burst cannot inflate MFU), per framework. FLOPs per token (`flops_per_token`):

    6 * N_matmul + 6 * n_layer * T * (qk_dim + v_dim)

- N_matmul counts every weight *application* in a matmul: the attention projections (decoupled:
  q_sem, k_sem, q_geo, k_geo, v_proj; else q_proj, k_proj, v_proj; a tied K still costs its own
  matmul), out_proj, the MLP (swiglu: w1, w2, w3; gelu: w1, w2), emb_in/emb_out when
  embed_dim != d_model, and the tied output projection vocab x embed_dim. Embedding lookups,
  norms, RoPE, softmax and the optimizer are not counted. 6 = 2 FLOPs per multiply-add x
  (forward + 2x backward).
- The attention term: per token and layer the QK^T scores cost 2*T*qk_dim FLOPs forward
  (qk_dim = sem_dim + geo_dim for decoupled: both paths are one concatenated dot) and P@V costs
  2*T*v_dim (v_dim = attn_dim); times 3 for forward + backward. Like nanoGPT/PaLM this counts the
  full T x T score matrix, not the causal half, so it is a convention rather than work done.

    python -m bench.train                     # config A, batch 8 x 256, Lion, fp32
    dba bench train --backends jax --steps 20 --json out.json

Meshes (`--mesh`, repeatable): the JAX step of `dba train --mesh ...` once per mesh, reporting
tokens/s per device and the compiled step's per-device memory (`compiled.memory_analysis()`:
arguments = parameters + optimizer state + batch shard, temporaries, outputs aliased to donated
inputs) next to the bytes of parameters and optimizer state actually held per device, which FSDP
shrinks ~1/fsdp. On a CPU, `--fake-devices N` splits it into N XLA devices that share its cores,
so per-device throughput there shows overhead, not scaling; the memory columns are exact.

    dba bench train --fake-devices 8 --mesh 1 --mesh data=8 --mesh fsdp=8 --mesh data=4,fsdp=2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import numpy as np

from bench.common import (CONFIGS, DEVICE_HELP, DEVICES, bench_main, bench_optim, best_per_call, in_fresh_process, machine,
                          named_config, nonneg_int, positive_int, print_table, torch_device, torch_sync, write_json)
from dba.config import ModelConfig
from dba.errors import UserError
from dba.optimizers import OPTIMIZERS


# jax_model.attention_kernels.ATTENTION_IMPLS, spelled out so building the parser does not import JAX.
ATTENTION_CHOICES = ("auto", "cudnn", "xla", "ours")


def add_step_arguments(p: argparse.ArgumentParser, steps: int, steps_help: str) -> None:
    """The JAX train step's config, batch shape, dtypes and optimizer, and how many steps:
    shared by `bench train` and `bench profile`, which build the same step."""
    p.add_argument("--config", choices=tuple(CONFIGS), default="A")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--steps", type=positive_int, default=steps, help=steps_help)
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed steps after compilation")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="lion")
    p.add_argument("--param-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--amp", action="store_true", help="matmuls in bf16 (softmax/logits/loss stay fp32)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default=None,
                   help="the JAX step's fresh causal attention (DBA_ATTENTION; default: its value, else auto)")
    p.add_argument("--seed", type=int, default=0)


def apply_attention_choice(args: argparse.Namespace) -> None:
    """`--attention` as DBA_ATTENTION, which the model reads when the step is traced."""
    if args.attention:
        os.environ["DBA_ATTENTION"] = args.attention


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_step_arguments(p, 10, "timed steps per backend")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--backends", default="jax,torch",
                   help="comma separated: jax, torch, torch-compile (`dba train --backend torch --compile`'s step; "
                        "its compile is the first step's time)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch intra-op threads (0 = all cores)")
    p.add_argument("--peak-size", type=nonneg_int, default=0,
                   help="n of the n x n x n peak matmul (0: 2048 on a CPU, 8192 on an accelerator)")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    p.add_argument("--malloc-tuning", choices=("jax", "all", "none"), default="jax",
                   help="which backends run with train.step.tune_host_malloc (dba train applies it to JAX)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--mesh", action="append", default=None, metavar="MESH",
                   help="benchmark the JAX step on this device mesh, e.g. 'fsdp=8' or '1' (repeatable; "
                        "replaces the backend comparison with a per-mesh table)")
    p.add_argument("--fake-devices", type=nonneg_int, default=0, metavar="N",
                   help="with --mesh on CPU: split the host into N XLA devices (XLA_FLAGS in the benchmark's process)")


# ---- FLOPs ------------------------------------------------------------------------------------
def matmul_params(cfg: ModelConfig) -> int:
    """Weights applied in matmuls per token (see the module docstring); embeddings lookups excluded."""
    d = cfg.d_model
    if cfg.attn_mode == "decoupled":
        proj = d * (2 * cfg.sem_dim + 2 * cfg.geo_dim + cfg.attn_dim)
    else:
        w = cfg.kv_streams()
        proj = d * (cfg.qk_dim + w["k"] + w["v"])
    out = cfg.v_dim * d
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
    bottleneck = 2 * cfg.embed_dim * d if cfg.embed_dim != d else 0
    return cfg.n_layer * (proj + out + mlp) + bottleneck + cfg.vocab_size * cfg.embed_dim


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """6 * N_matmul + 6 * n_layer * T * (qk_dim + v_dim): forward + backward, full T x T scores."""
    return 6 * matmul_params(cfg) + 6 * cfg.n_layer * seq_len * (cfg.qk_dim + cfg.v_dim)


# ---- matmul peaks ---------------------------------------------------------------------------
def jax_peak(n: int, dtype: str, repeats: int = 7) -> float:
    """GFLOP/s of a jitted n x n @ n x n jnp.dot, best of `repeats`."""
    import jax
    import jax.numpy as jnp

    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
    f(a, b).block_until_ready()
    calls = 1 if jax.default_backend() == "cpu" else 10
    return 2 * n**3 / best_per_call(lambda: f(a, b), lambda out: out.block_until_ready(), calls, repeats) / 1e9


def torch_peak(n: int, dtype: str, device: str = "cpu", repeats: int = 7) -> float:
    import torch

    n = n or (2048 if device == "cpu" else 8192)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    torch.matmul(a, b)
    torch_sync(device)
    calls = 1 if device == "cpu" else 10
    return 2 * n**3 / best_per_call(lambda: torch.matmul(a, b), lambda out: torch_sync(device), calls, repeats) / 1e9


# ---- the two steps --------------------------------------------------------------------------
def _timed(step, n_warmup: int, n_steps: int) -> tuple[float, list[float]]:
    """(warm-up seconds, per-step seconds); `step()` must block until the step is done."""
    t0 = time.perf_counter()
    for _ in range(n_warmup):
        step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return warm, times


def _jax_stepper(cfg: ModelConfig, args: argparse.Namespace, mesh=None):
    """`dba train`'s Stepper for the benchmark's dtypes and optimizer (on `mesh` when given)."""
    import jax.numpy as jnp
    from flax import nnx

    from jax_model import DBAModel
    from train.optim import build_optimizer
    from train.step import Stepper

    param = jnp.bfloat16 if args.param_dtype == "bf16" else jnp.float32
    model = DBAModel(cfg, rngs=nnx.Rngs(args.seed), dtype=jnp.bfloat16 if args.amp else param, param_dtype=param)
    return Stepper(model, build_optimizer(bench_optim(args), 10_000), seed=args.seed, mesh=mesh)


def _time_stepper(stepper, xs: list, ys: list, args: argparse.Namespace):
    """Compile, then time `args.steps` train steps after `args.warmup` untimed ones, cycling the
    batches; (compile_s, warmup_s, step times, step) where `step()` runs one more step."""
    import jax

    compile_s = stepper.compile_for(xs[0], ys[0])
    i = [0]

    def step():
        k = i[0] % len(xs)
        m = stepper.train_step(xs[k], ys[k], i[0])
        jax.block_until_ready((m, stepper.params))
        i[0] += 1
        return m

    warm, times = _timed(step, args.warmup, args.steps)
    return compile_s, warm, times, step


def bench_jax(cfg: ModelConfig, args: argparse.Namespace, batches) -> dict:
    import jax

    stepper = _jax_stepper(cfg, args)
    xs = [jax.device_put(x) for x, _ in batches]
    ys = [jax.device_put(y) for _, y in batches]
    compile_s, warm, times, step = _time_stepper(stepper, xs, ys, args)
    loss = float(step()["loss"])
    return {"compile_s": compile_s, "warmup_s": warm, "step_s": times, "final_loss": loss,
            "jax": jax.__version__, "devices": str(jax.devices()), "device": jax.default_backend(),
            "device_name": jax.devices()[0].device_kind,
            "attention": os.environ.get("DBA_ATTENTION", "auto")}


def bench_torch(cfg: ModelConfig, args: argparse.Namespace, batches, compile: bool = False) -> dict:
    import torch

    import torch_ref
    from torch_train.step import TorchStepper
    from train.config import PrecisionConfig

    device = torch_device(args.device)
    torch.manual_seed(args.seed)
    model = torch_ref.DBAModel(cfg).to(device)
    if args.param_dtype == "bf16":
        model = model.to(torch.bfloat16)
    stepper = TorchStepper(model, bench_optim(args), PrecisionConfig(amp=bool(args.amp), amp_dtype="bf16"),
                           total_steps=10_000, seed=args.seed, compile=compile)
    xs = [stepper.put_batch(x) for x, _ in batches]
    ys = [stepper.put_batch(y) for _, y in batches]
    i = [0]

    def step():
        k = i[0] % len(xs)
        m = stepper.fetch(stepper.train_step(xs[k], ys[k], i[0]))  # fetch: synchronous
        i[0] += 1
        return m

    t0 = time.perf_counter()
    step()  # first step: allocator/oneDNN warm-up (and torch.compile), the analogue of compiling
    first = time.perf_counter() - t0
    if compile and not stepper.compiling:
        raise UserError(f"--backends torch-compile: {stepper.compile_note}", 1)
    warm, times = _timed(step, args.warmup, args.steps)
    return {"compile_s": first, "warmup_s": warm, "step_s": times, "final_loss": step()["loss"],
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
            "device_name": torch.cuda.get_device_name() if device == "cuda" else device}


def _child(backend: str, args: argparse.Namespace, cfg: ModelConfig, batches, peak_dtype: str) -> dict:
    """One backend, in a fresh process: its matmul peak, then its train step."""
    tuned = False
    if args.malloc_tuning == "all" or args.malloc_tuning == backend:
        from train.step import tune_host_malloc

        tuned = tune_host_malloc()  # before JAX/torch start their thread pools
    apply_attention_choice(args)
    if backend.startswith("torch"):
        import torch

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        measure_peak = partial(torch_peak, args.peak_size, peak_dtype, torch_device(args.device))
    else:
        measure_peak = partial(jax_peak, args.peak_size, peak_dtype)
    peak = measure_peak()
    print(f"  {backend} matmul peak ({args.peak_size or 'auto'}^3, {peak_dtype}): {peak:,.1f} GFLOP/s", flush=True)
    r = (bench_jax(cfg, args, batches) if backend == "jax"
         else bench_torch(cfg, args, batches, compile=backend == "torch-compile"))
    # Measured again after the step: on a shared machine a neighbour's burst during the first
    # measurement would lower the peak and inflate MFU; the better of the two is the peak.
    after = measure_peak()
    print(f"  {backend} matmul peak after the step: {after:,.1f} GFLOP/s", flush=True)
    return {**r, "peak_gflop_s": max(peak, after), "peak_gflop_s_start_end": [peak, after], "malloc_tuned": tuned}


def run(args: argparse.Namespace) -> int:
    if args.mesh:
        return run_meshes(args)
    cfg = named_config(args.config)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - {"jax", "torch", "torch-compile"})
    if unknown:
        raise UserError(f"--backends: unknown backend(s) {', '.join(unknown)} (choose from jax, torch, torch-compile)")
    b, t, a = args.batch_size, args.seq_len, args.grad_accum
    rng = np.random.default_rng(args.seed)
    # A few distinct batches, cycled; x and y are (A, B, T) int32 like dba train's.
    batches = []
    for _ in range(4):
        tok = rng.integers(0, cfg.vocab_size, (a, b, t + 1), dtype=np.int64).astype(np.int32)
        batches.append((tok[..., :-1].copy(), tok[..., 1:].copy()))
    tokens_per_step = a * b * t
    fpt = flops_per_token(cfg, t)
    peak_dtype = "bf16" if args.amp or args.param_dtype == "bf16" else "fp32"

    results, rows = [], []
    for backend in backends:
        r = in_fresh_process(_child, backend, args, cfg, batches, peak_dtype)
        med = statistics.median(r["step_s"])
        tok_s = tokens_per_step / med
        gflops = tok_s * fpt / 1e9
        res = {"backend": backend, **r, "step_ms_median": med * 1e3, "step_ms_best": min(r["step_s"]) * 1e3,
               "tokens_per_s": tok_s, "tokens_per_s_best": tokens_per_step / min(r["step_s"]),
               "gflop_s": gflops, "mfu": gflops / r["peak_gflop_s"]}
        results.append(res)
        rows.append([backend, r.get("device_name", ""), f"{tok_s:,.0f}", f"{res['step_ms_median']:.1f}", f"{res['step_ms_best']:.1f}",
                     f"{gflops:.1f}", f"{r['peak_gflop_s']:.1f}", f"{100 * res['mfu']:.1f}",
                     f"{r['compile_s']:.1f}", f"{r['final_loss']:.3f}"])
        print(f"  done {backend}: {tok_s:,.0f} tokens/s", flush=True)

    dt = f"params {args.param_dtype}" + (", amp bf16" if args.amp else "")
    title = (f"Train step, config {args.config}, batch {b} x seq {t}" + (f" x accum {a}" if a > 1 else "")
             + f", {args.optimizer}, {dt}; {fpt / 1e6:.2f} MFLOP/token; median of {args.steps} steps")
    print_table(title, ["backend", "device", "tokens/s", "step ms", "best ms", "GFLOP/s", "peak GFLOP/s", "MFU %",
                        "compile s", "loss"], rows)
    fastest = max(results, key=lambda r: r["tokens_per_s"])
    print(f"fastest here at {dt}: {fastest['backend']}, {fastest['tokens_per_s']:,.0f} tokens/s "
          f"(MFU against the {peak_dtype} matmul peak; run again with{'out' if args.amp else ''} --amp to compare "
          "precisions)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other processes skew timings)")
    write_json(args.json, {"bench": "train", "fastest": fastest["backend"], "config": cfg.to_dict(), "machine": machine(), "load": load,
                           "batch_size": b, "seq_len": t, "grad_accum": a, "optimizer": args.optimizer,
                           "param_dtype": args.param_dtype, "amp": args.amp, "malloc_tuning": args.malloc_tuning,
                           "flops_per_token": fpt, "matmul_params": matmul_params(cfg),
                           "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": results})
    return 0


# ---- meshes -----------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def bench_mesh(cfg: ModelConfig, args: argparse.Namespace, batches, mesh_text: str) -> dict:
    """The `dba train` step on one mesh: timing, compiled per-device memory, state bytes per device."""
    import jax

    from train import sharding

    mesh = sharding.make_mesh(sharding.parse_mesh(mesh_text))
    stepper = _jax_stepper(cfg, args, mesh)
    xs = [stepper.put_batch(x) for x, _ in batches]
    ys = [stepper.put_batch(y) for _, y in batches]
    compile_s, warm, times, step = _time_stepper(stepper, xs, ys, args)
    mem = stepper.compiled(xs[0], ys[0]).memory_analysis()

    def get(name: str) -> int:  # memory_analysis() may be None on some backends
        return int(getattr(mem, name, 0) or 0)

    return {"mesh": sharding.mesh_shape(mesh), "mesh_text": sharding.mesh_text(sharding.mesh_shape(mesh)),
            "devices": int(mesh.size), "compile_s": compile_s, "warmup_s": warm, "step_s": times,
            "final_loss": float(step()["loss"]),
            "param_bytes_per_device": sharding.per_device_bytes(stepper.params),
            "opt_bytes_per_device": sharding.per_device_bytes(stepper.opt_state),
            "argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
            "alias_bytes": get("alias_size_in_bytes"), "temp_bytes": get("temp_size_in_bytes"),
            "platform": jax.default_backend(), "device_count": jax.device_count()}


def _mesh_child(args: argparse.Namespace, cfg: ModelConfig, batches) -> list[dict]:
    if args.malloc_tuning in ("jax", "all"):
        from train.step import tune_host_malloc

        tune_host_malloc()
    out = []
    for m in args.mesh:
        out.append(bench_mesh(cfg, args, batches, m))
        print(f"  done mesh {m}: {statistics.median(out[-1]['step_s']) * 1e3:.0f} ms/step", flush=True)
    return out


def run_meshes(args: argparse.Namespace) -> int:
    """One fresh process (XLA_FLAGS set before it imports JAX) runs the step on every --mesh."""
    from train import sharding

    cfg = named_config(args.config)
    b, t, a = args.batch_size, args.seq_len, args.grad_accum
    for m in args.mesh:  # syntax and batch split, before starting anything
        sharding.check_batch(sharding.parse_mesh(m), b)
    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(4):
        tok = rng.integers(0, cfg.vocab_size, (a, b, t + 1), dtype=np.int64).astype(np.int32)
        batches.append((tok[..., :-1].copy(), tok[..., 1:].copy()))
    old = os.environ.get("XLA_FLAGS")
    if args.fake_devices:  # the spawned child reads the environment when it imports JAX
        flags = [f for f in (old or "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={args.fake_devices}"])
    try:
        results = in_fresh_process(_mesh_child, args, cfg, batches)
    finally:
        if args.fake_devices and old is None:
            os.environ.pop("XLA_FLAGS", None)
        elif args.fake_devices:
            os.environ["XLA_FLAGS"] = old

    tokens_per_step = a * b * t
    rows = []
    for r in results:
        med = statistics.median(r["step_s"])
        r.update(step_ms_median=med * 1e3, tokens_per_s=tokens_per_step / med,
                 tokens_per_s_per_device=tokens_per_step / med / r["devices"])
        state = r["param_bytes_per_device"] + r["opt_bytes_per_device"]
        rows.append([r["mesh_text"], r["devices"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_per_device']:,.0f}",
                     f"{r['step_ms_median']:.0f}", _mib(r["param_bytes_per_device"]), _mib(r["opt_bytes_per_device"]),
                     _mib(state), _mib(r["argument_bytes"]), _mib(r["temp_bytes"]),
                     _mib(r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"]),
                     f"{r['compile_s']:.1f}", f"{r['final_loss']:.4f}"])
    r0 = results[0]
    title = (f"Train step per mesh, config {args.config}, global batch {b} x seq {t}" + (f" x accum {a}" if a > 1 else "")
             + f", {args.optimizer}, params {args.param_dtype}; {r0['device_count']} {r0['platform']} devices"
             + (" (fake: they share the host's cores)" if args.fake_devices else "") + f"; median of {args.steps} steps")
    print_table(title, ["mesh", "devices", "tokens/s", "tokens/s/device", "step ms", "params MiB/dev",
                        "opt MiB/dev", "state MiB/dev", "compiled args MiB/dev", "temp MiB/dev",
                        "total MiB/dev", "compile s", "loss"], rows)
    print("state = parameters + optimizer state held by one device; compiled args/temp/total from "
          "memory_analysis() of the step (total = args + outputs - donated aliases + temp)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other processes skew timings)")
    write_json(args.json, {"bench": "train_mesh", "config": cfg.to_dict(), "machine": machine(), "load": load,
                           "batch_size": b, "seq_len": t, "grad_accum": a, "optimizer": args.optimizer,
                           "param_dtype": args.param_dtype, "fake_devices": args.fake_devices, "results": results})
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.train", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
