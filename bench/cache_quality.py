"""What the KV cache's size costs in quality, for a decoupled model and a standard-attention model of
the same size trained on the same data: the README's cache-quality table.

    python -m bench.cache_quality                 # trains both (the default recipe), then evaluates

1. `dba train` twice with the default recipe (the built-in corpus, 600 steps, context 128): once
   as it is (decoupled) and once with `--attn-mode standard`; a finished run is reused.
2. `dba eval` on each, at the trained context and at 4x, for fp16, q8_0, q4_0 (every stream 4-bit),
   nf4, v29's heterogeneous default (q4_0 with 8-bit geometric keys), q4_0 with rotated keys, and
   the self-optimizing choice under a budget (a third of the decoupled fp16 cache at 4x). Every
   quantized policy keeps a 32-token fp16 window, so most of the cache is quantized.
3. One Markdown table: KV bytes per token, compression against the standard model's fp16 cache at
   the same context, delta NLL and KL against the fp32 cache, top-1 agreement, passkey accuracy at
   50% depth (fp32 cache in brackets).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import bench_main, positive_int, print_table, write_json

WINDOW = 32
POLICIES = {
    "decoupled": {"fp16": "fp16", "q8_0": f"q8_0,residual={WINDOW}", "q4_0": f"all=q4_0,residual={WINDOW}",
                  "nf4": f"all=nf4,residual={WINDOW}", "v29 hetero (q4_0, k_geo q8_0)": f"q4_0,residual={WINDOW}",
                  "q4_0+rot": f"k_sem=q4_0+rot,k_geo=q4_0+rot,v=q4_0,residual={WINDOW}"},
    "standard": {"fp16": "fp16", "q8_0": f"q8_0,residual={WINDOW}", "q4_0": f"all=q4_0,residual={WINDOW}",
                 "nf4": f"all=nf4,residual={WINDOW}", "v29 hetero (q4_0, k_geo q8_0)": f"q4_0,residual={WINDOW}",
                 "q4_0+rot": f"k=q4_0+rot,v=q4_0,residual={WINDOW}"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-root", default="runs/cache_quality", help="where the two runs go (reused when finished)")
    p.add_argument("--steps", type=positive_int, default=600, help="training steps of each run")
    p.add_argument("--windows", type=positive_int, default=8)
    p.add_argument("--passkey-trials", type=positive_int, default=8)
    p.add_argument("--backend", choices=("jax", "torch"), default="jax")
    p.add_argument("--json", default=None, help="also write the results here")


def _dba(*argv: str, may_fail: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if r.returncode != 0 and not may_fail:
        from dba.errors import UserError

        raise UserError(f"`dba {' '.join(argv[:3])} ...` failed (exit {r.returncode}): "
                        f"{(r.stderr.strip().splitlines() or ['?'])[-1]}", 1)
    return r


def _trained(run: Path, mode: str, steps: int) -> None:
    done = run / "train.jsonl"
    if done.is_file() and '"reason": "complete"' in done.read_text():
        print(f"reusing {run}", file=sys.stderr)
        return
    print(f"training {run} ({mode}, {steps} steps)...", file=sys.stderr)
    _dba("train", "--attn-mode", mode, "--steps", str(steps), "--out-dir", str(run), "--live", "off", "--overwrite")


def run(args: argparse.Namespace) -> int:
    from dba.config import ModelConfig
    from dba.kvspec import KVPolicy, kv_bytes
    from dba.weight_files import read_weights

    root = Path(args.run_root)
    runs = {mode: root / mode for mode in POLICIES}
    for mode, path in runs.items():
        _trained(path, mode, args.steps)
    cfgs: dict[str, ModelConfig] = {mode: read_weights(path)[0] for mode, path in runs.items()}
    ctx = cfgs["decoupled"].block_size
    contexts = (ctx, 4 * ctx)
    budget_mb = kv_bytes(cfgs["decoupled"], 4 * ctx, 1, KVPolicy())["total_bytes"] / 3 / 2**20
    rows, records, notes = [], [], []
    for mode, path in runs.items():
        names = dict(POLICIES[mode])
        out = root / f"eval-{mode}.json"
        print(f"evaluating {path} ...", file=sys.stderr)
        common = ["eval", "--ckpt", str(path), "--backend", args.backend, "--policies", ";".join(names.values()),
                  "--contexts", ",".join(map(str, contexts)), "--tasks", "ppl,passkey", "--depths", "0.5",
                  "--windows", str(args.windows), "--passkey-trials", str(args.passkey_trials), "--json", str(out)]
        r = _dba(*common, "--self-opt", "startup", "--self-opt-mem-budget-mb", f"{budget_mb:.6f}",
                 "--self-opt-residuals", f"0,{WINDOW}", may_fail=True)
        if r.returncode != 0:  # nothing fits the budget (the standard model's cache is too big): say so
            why = (r.stderr.strip().splitlines() or ["?"])[-1].split("error: ", 1)[-1].split(";")[0]
            _dba(*common)
            notes.append(f"{mode}: self-opt under the {budget_mb * 1024:.0f}KB budget: {why}")
        recs = json.loads(out.read_text())["records"]
        records += [{**r, "model": mode} for r in recs]
        label_of = {v: k for k, v in names.items()}
        for c in contexts:
            base = kv_bytes(cfgs["standard"], c, 1, KVPolicy())["total_bytes"]
            for r in (r for r in recs if r["task"] == "ppl" and r["ctx"] == c):
                pk = next(p for p in recs if p["task"] == "passkey" and p["ctx"] == c and p["policy"] == r["policy"])
                name = label_of.get(r["policy"], "self-opt, budget " + f"{budget_mb * 1024:.0f}KB: "
                                    + r["policy"].removeprefix("self-opt: "))
                rows.append([mode, name, c, f"{r['kv_bytes'] / c:,.0f}", f"{base / r['kv_bytes']:.2f}x",
                             f"{r['delta_nll']:+.4f}", f"{r['kl']:.1e}", f"{r['top1']:.3f}",
                             f"{pk['accuracy']:.2f} ({pk['accuracy_fp32']:.2f})"])
    print_table(f"Cache quality: the default recipe ({args.steps} steps, context {ctx}) as decoupled and as standard "
                f"attention; every quantized policy keeps a {WINDOW}-token fp16 window; {args.backend}",
                ["model", "policy", "ctx", "KV bytes/token", "vs std fp16", "Δnll", "KL", "top-1",
                 "passkey @50% (fp32)"], rows)
    for note in notes:
        print(f"\n{note}")
    write_json(args.json, {"records": records, "budget_mb": budget_mb, "contexts": list(contexts), "notes": notes})
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("python -m bench.cache_quality", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
