"""Where the JAX train step's time goes: a `jax.profiler` trace of a few steps, summarised.

Builds the same step as `dba bench train` (config, batch, dtypes, optimizer, `--attention`),
compiles and warms it up, traces `--steps` steps, then reads the trace's Perfetto JSON and
prints the device time per op name (on a GPU: the kernels on its streams; on a CPU: the XLA
thunks on its worker threads) as milliseconds per step and share of the traced device time,
plus the compiled step's `cost_analysis()` FLOPs and bytes. The raw trace stays in `--trace-dir`
for Perfetto (ui.perfetto.dev) or TensorBoard's profile plugin.

    dba bench profile --config seed --batch-size 16 --seq-len 1024 --param-dtype bf16 --amp
    python -m bench.profile --steps 3 --top 25          # config A on this machine
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import numpy as np

from bench.common import bench_main, named_config, positive_int, print_table, write_json
from bench.train import add_step_arguments, apply_attention_choice
from dba.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_step_arguments(p, 3, "traced steps")
    p.add_argument("--top", type=positive_int, default=30, help="op names listed")
    p.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the summary here")


def _load_trace(trace_dir: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no Perfetto trace")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_op_times(events: list[dict]) -> tuple[collections.Counter, str]:
    """Microseconds per op name on the device's timelines (GPU streams, or XLA's CPU workers)."""
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {pid for pid, name in procs.items() if "GPU" in name or "device:" in name}
    times: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if gpu:
            # Kernels and copies on the GPU's streams; XLA's "XLA Ops"/"XLA Modules" lines would
            # count the same time again under HLO names.
            thread = threads.get((e["pid"], e["tid"]), "")
            if e["pid"] in gpu and "Stream" in thread:
                times[e["name"]] += e["dur"]
        elif threads.get((e["pid"], e["tid"]), "").startswith("tf_XLA") and not e["name"].startswith("end:"):
            if "Await" not in e["name"] and not e["name"].startswith("ThunkExecutor"):
                times[e["name"]] += e["dur"]
    return times, "gpu" if gpu else "cpu"


_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (\S+) .*?metadata=\{op_name=\"([^\"]*)\"")


def hlo_op_notes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "result type  jax op" from a compiled module's text, so a trace's
    op names (fusion.12, ynn_fusion.161) say what they compute. Kernels named by a library
    (cuBLAS, cuDNN) have no HLO name and get no note."""
    notes = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            name, typ, op = m.groups()
            notes[name] = f"{typ.split('{')[0]} {op.split('/', 1)[-1]}"
    return notes


def run(args: argparse.Namespace) -> int:
    apply_attention_choice(args)
    import jax

    from bench.train import _jax_stepper

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="dba-profile-")
    try:
        os.makedirs(trace_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=trace_dir).close()
    except OSError as e:
        raise UserError(f"--trace-dir {trace_dir}: cannot write there ({e.strerror})", 1) from None

    cfg = named_config(args.config)
    b, t = args.batch_size, args.seq_len
    rng = np.random.default_rng(args.seed)
    tok = rng.integers(0, cfg.vocab_size, (1, b, t + 1)).astype(np.int32)
    x, y = jax.device_put(tok[..., :-1].copy()), jax.device_put(tok[..., 1:].copy())
    stepper = _jax_stepper(cfg, args)
    compile_s = stepper.compile_for(x, y)
    compiled = stepper.compiled(x, y)
    notes = hlo_op_notes(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    for i in range(args.warmup):
        jax.block_until_ready(stepper.train_step(x, y, i))

    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for i in range(args.steps):
        m = stepper.train_step(x, y, args.warmup + i)
    jax.block_until_ready((m, stepper.params))
    wall = (time.perf_counter() - t0) / args.steps
    jax.profiler.stop_trace()
    times, where = device_op_times(_load_trace(trace_dir))
    total = sum(times.values())
    rows = [[name[:60], notes.get(name, "")[:90], f"{us / 1e3 / args.steps:.3f}", f"{100 * us / total:.1f}"]
            for name, us in times.most_common(args.top)]
    print_table(f"Device time per op, config {args.config}, batch {b} x seq {t}, {args.steps} traced steps "
                f"({where}; {total / 1e3 / args.steps:.2f} ms of op time per step, {wall * 1e3:.2f} ms wall per "
                f"step under the profiler)", ["op", "HLO result and jax op", "ms/step", "% of op time"], rows)
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    print(f"compiled step (cost_analysis): {flops / 1e9:,.1f} GFLOP, {nbytes / 1e9:,.2f} GB accessed; "
          f"compile {compile_s:.1f} s; trace in {trace_dir}")
    write_json(args.json, {"bench": "profile", "config": cfg.to_dict(), "batch_size": b, "seq_len": t,
                           "where": where, "steps": args.steps, "wall_s_per_step": wall,
                           "op_us_per_step": {k: v / args.steps for k, v in times.most_common()},
                           "cost_flops": flops, "cost_bytes": nbytes, "trace_dir": trace_dir})
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.profile", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
