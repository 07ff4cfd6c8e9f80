"""The GPU check in one command: what no CPU run can say about dba on a GPU, measured and judged.

    dba bench gpu --json gpu.json            # on a machine with an NVIDIA GPU: ~6-8 minutes
    dba bench gpu --device cpu               # the same parts at toy sizes on a CPU (a rehearsal:
                                             # it checks the command end to end, times nothing useful)

Parts, each in fresh processes (one framework at a time on the device):
1. kernels: for every cache kind (fp16, q8_0, q4_0, nf4) and every fused decode kernel (pallas on
   JAX; triton1pass and triton2pass on torch), one decode step after a short prompt with the
   kernel and with the cached attention (`decode.kernel_disagreement`, what `--kv-fused auto`
   checks on first use): agrees within dba/kernel_check.py's tolerance, or why not.
2. decode: `dba bench decode` on config A at 32k and 128k tokens, fp16 and q4_0 (q8_0 and nf4 at
   32k), each kernel beside the cached attention, JAX, torch and the compiled torch step; its
   "x 1 read" column is the decode step over the time to read the cache once at the measured
   bandwidth.
3. train: `dba bench train` on the seed config (batch 16 x seq 1024, bf16 parameters, bf16
   matmuls), JAX, torch and the compiled torch step (its fused linear + cross-entropy head has
   never been timed on a GPU), MFU against the measured bf16 matmul peak.
4. resume: `dba train --backend torch --device cuda` for 2 steps, then `--resume` to 4: both exit
   0 and the second leg starts from step 2.
Then one table of the goals (the issue's): seed-config MFU >= 45% (bf16), 128k decode within 2x
of one cache read for fp16 and q4_0, every quantized kind faster than fp16 from 32k; and the
JSON of every part (`--json`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_main, in_fresh_process, machine, print_table, run_dba, write_json
from dba.errors import UserError

KINDS = ("fp16", "q8_0", "q4_0", "nf4")
KERNELS = {"jax": ("pallas",), "torch": ("triton1pass", "triton2pass")}
# (contexts, kinds) of the decode part, on a GPU and in the CPU rehearsal
DECODE = {"gpu": [("32768", "fp16,q8_0,q4_0,nf4"), ("131072", "fp16,q4_0")],
          "cpu": [("512", "fp16,q4_0")]}
# the rehearsal leaves the interpreted kernels to part 1 (interpreted, they would take minutes here)
DECODE_KERNELS = {"gpu": "none,pallas,triton1pass,triton2pass", "cpu": "none"}
TRAIN = {"gpu": ["--config", "seed", "--batch-size", "16", "--seq-len", "1024", "--steps", "10", "--warmup", "3"],
         "cpu": ["--config", "A", "--batch-size", "2", "--seq-len", "64", "--steps", "2", "--warmup", "1"]}
MFU_GOAL, READS_GOAL = 0.45, 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the GPU, refused without one; cpu: the rehearsal at toy sizes")
    p.add_argument("--parts", default="kernels,decode,train,resume", help="comma separated subset")
    p.add_argument("--keep", default=None, help="keep the parts' JSON, logs and run directories here")
    p.add_argument("--json", default=None, help="also write the results here")


def _has_gpu() -> bool:
    def probe() -> bool:
        import torch

        return bool(torch.cuda.is_available())

    try:
        return bool(in_fresh_process(probe))
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPU to check
        return False


# ---- 1. kernels --------------------------------------------------------------------------------
def _kernel_child(backend: str, kinds: tuple[str, ...], kernels: tuple[str, ...], device: str) -> list[dict]:
    """Every (kind, kernel) of one framework on its device: None (agrees) or the reason."""
    from bench.common import named_config
    from dba.kvspec import KVPolicy

    cfg = named_config("A", null_attn=True)
    out = []
    if backend == "jax":
        import jax_model
        from jax_model.decode import kernel_disagreement
        from jax_model.pallas_decode import resolve_kv_fused

        model = jax_model.DBAModel(cfg)
        resolve = resolve_kv_fused
    else:
        import torch

        import torch_ref
        from torch_ref.decode import kernel_disagreement
        from torch_ref.triton_decode import resolve_kv_fused

        torch.manual_seed(0)
        model = torch_ref.DBAModel(cfg).eval().to("cuda" if device == "gpu" else "cpu")
        resolve = lambda choice: resolve_kv_fused(choice, model.device)  # noqa: E731
    for kind in kinds:
        for kernel in kernels:
            mode, label = resolve(kernel)
            t0 = time.perf_counter()
            why = kernel_disagreement(model, KVPolicy(kind=kind, residual=128), 1, 256, 128, mode)
            out.append({"backend": backend, "kind": kind, "kernel": label, "agrees": why is None, "why": why,
                        "seconds": time.perf_counter() - t0})
            print(f"  {backend} {label} {kind}: {'agrees' if why is None else why}", flush=True)
    return out


# ---- the parts ----------------------------------------------------------------------------------
def part_kernels(where: str, d: Path) -> dict:
    rows = []
    for backend, kernels in KERNELS.items():
        rows += in_fresh_process(_kernel_child, backend, KINDS, kernels, where)
    return {"results": rows}


def part_decode(where: str, d: Path) -> dict:
    out = []
    for i, (contexts, kinds) in enumerate(DECODE[where]):
        path = d / f"decode_{i}.json"
        r = run_dba("bench", "decode", "--config", "A", "--contexts", contexts, "--kinds", kinds,
                    "--new-tokens", 32 if where == "gpu" else 4, "--repeats", 3 if where == "gpu" else 1,
                    "--backends", "jax,torch,torch-compile", "--kv-fused", DECODE_KERNELS[where],
                    "--device", "cuda" if where == "gpu" else "cpu", "--json", path, log=d / f"decode_{i}.log")
        print(_tables(r.stdout), flush=True)
        out += json.loads(path.read_text())["results"]
    return {"results": out}


def part_train(where: str, d: Path) -> dict:
    path = d / "train.json"
    r = run_dba("bench", "train", *TRAIN[where], "--param-dtype", "bf16", "--amp",
                "--backends", "jax,torch,torch-compile", "--device", "cuda" if where == "gpu" else "cpu",
                "--json", path, log=d / "train.log")
    print(_tables(r.stdout), flush=True)
    return json.loads(path.read_text())


def part_resume(where: str, d: Path) -> dict:
    from dba.runlog import read_events

    data = d / "tokens.npy"
    np.save(data, (np.random.default_rng(0).integers(0, 97, 20_000)).astype(np.uint16))
    run = d / "resume_run"
    common = ["--data", data, "--vocab-size", 97, "--d-model", 48, "--layers", 2, "--n-head", 3, "--d-ff", 96,
              "--attn-dim", 48, "--sem-dim", 12, "--geo-dim", 24, "--batch-size", 4, "--train-seq-len", 32,
              "--eval-every", 2, "--eval-iters", 1, "--log-every", 1, "--live", "off", "--out-dir", run]
    device = "cuda" if where == "gpu" else "cpu"
    t0 = time.perf_counter()
    run_dba("train", *common, "--backend", "torch", "--device", device, "--steps", 2, log=d / "resume_1.log")
    run_dba("train", "--out-dir", run, "--resume", "--steps", 4, "--live", "off", log=d / "resume_2.log")
    metas = read_events(run / "train.jsonl", "meta")
    steps = [e["step"] for e in read_events(run / "train.jsonl", "train")]
    resumed = [m.get("resumed_from") for m in metas]
    ok = resumed == [None, 2] and steps == [1, 2, 3, 4]
    print(f"  torch trainer on {device}: legs resumed from {resumed}, steps {steps}: {'ok' if ok else 'NOT OK'}",
          flush=True)
    return {"device": device, "resumed_from": resumed, "steps": steps, "ok": ok,
            "seconds": time.perf_counter() - t0}


def _tables(stdout: str) -> str:
    """The table(s) a bench printed (title, rows and the notes under them), without its progress."""
    return "\n\n".join(chunk for chunk in stdout.strip().split("\n\n") if "\n|" in chunk)


PARTS = {"kernels": part_kernels, "decode": part_decode, "train": part_train, "resume": part_resume}


# ---- the verdicts -------------------------------------------------------------------------------
def verdicts(results: dict[str, Any], where: str) -> list[list[str]]:
    """The summary table's rows: part, what was measured, the value, the goal, met."""
    rows = []
    if "kernels" in results:
        ks = results["kernels"]["results"]
        bad = [f"{r['backend']} {r['kernel']} {r['kind']}: {r['why']}" for r in ks if not r["agrees"]]
        rows.append(["kernels", f"{len(ks)} kernel x kind checks vs the cached attention",
                     f"{len(ks) - len(bad)} agree" + (f"; {'; '.join(bad)}" if bad else ""), "all agree",
                     "yes" if not bad else "no"])
    if "decode" in results:
        dec = results["decode"]["results"]
        longest = max(int(r["ctx"]) for r in dec)
        for kind in ("fp16", "q4_0"):
            cands = [r for r in dec if int(r["ctx"]) == longest and r["kind"] == kind]
            if cands:
                best = min(cands, key=lambda r: r["decode_step_over_one_read"])
                x = best["decode_step_over_one_read"]
                rows.append(["decode", f"{kind} at {longest:,}: best step over one cache read "
                                       f"({best['backend']}, {best['kernel']})", f"{x:.1f}x",
                             f"<= {READS_GOAL:g}x", "yes" if x <= READS_GOAL else "no"])
        for ctx in sorted({int(r["ctx"]) for r in dec}):
            best = {}
            for r in dec:
                if int(r["ctx"]) == ctx:
                    best[r["kind"]] = max(best.get(r["kind"], 0.0), r["decode_tok_s"])
            if "fp16" in best and len(best) > 1:
                slower = [k for k, v in best.items() if k != "fp16" and v <= best["fp16"]]
                rows.append(["decode", f"quantized vs fp16 at {ctx:,} (best tok/s each)",
                             ", ".join(f"{k} {v:,.0f}" for k, v in sorted(best.items())), "quantized faster",
                             "yes" if not slower else f"no ({', '.join(slower)})"])
    if "train" in results:
        for r in results["train"]["results"]:
            rows.append(["train", f"{results['train']['config'].get('d_model')}-wide step, {r['backend']}",
                         f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%", f">= {100 * MFU_GOAL:.0f}%",
                         "yes" if r["mfu"] >= MFU_GOAL else "no"])
    if "resume" in results:
        r = results["resume"]
        rows.append(["resume", f"torch trainer on {r['device']}: 2 steps, then --resume to 4",
                     f"resumed from {r['resumed_from'][-1]}, steps {r['steps']}", "from 2, steps 1-4",
                     "yes" if r["ok"] else "no"])
    if where == "cpu":
        rows = [row[:3] + [row[3], "(rehearsal)"] for row in rows]
    return rows


def run(args: argparse.Namespace) -> int:
    parts = [p for p in args.parts.split(",") if p]
    if not parts or sorted(set(parts) - set(PARTS)):
        raise UserError(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}", 2)
    if args.device == "cpu":
        where = "cpu"
    elif _has_gpu():
        where = "gpu"
    else:
        raise UserError("dba bench gpu: no CUDA GPU here (torch.cuda.is_available() is False); "
                        "--device cpu rehearses the check at toy sizes", 1)
    keep = Path(args.keep) if args.keep else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dba-bench-gpu-") as tmp:
        d = keep or Path(tmp)
        for part in parts:
            print(f"== {part}", flush=True)
            t0 = time.perf_counter()
            results[part] = PARTS[part](where, d)
            results[part]["part_seconds"] = time.perf_counter() - t0
    rows = verdicts(results, where)
    print_table(f"dba bench gpu ({'CPU rehearsal, toy sizes' if where == 'cpu' else 'GPU'}): "
                f"{time.perf_counter() - t_start:.0f} s", ["part", "measured", "value", "goal", "met"], rows)
    write_json(args.json, {"bench": "gpu", "where": where, "machine": machine(), "results": results,
                           "verdicts": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.gpu", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
