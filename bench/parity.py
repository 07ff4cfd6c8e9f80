"""Parity report: worst JAX-vs-torch errors per attention mode, the v29 fixture, and cached
decode per cache kind. Prints the README's parity table.

    python -m bench.parity            # the cases of bench/parity_cases.py, as parity_tests/ checks them
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    import jax_model
    import torch_ref
    from bench.common import print_table, write_json
    from dba.kvspec import KVPolicy
    from bench.parity_cases import (build_jax, build_torch, config_matrix, grad_errors, init_like_state, jax_grads_canonical,
                                    make_config, random_state, random_tokens)

    worst: dict[str, dict[str, float]] = {}
    for name, cfg in config_matrix():
        state = random_state(cfg, seed=7)
        tokens, targets = random_tokens(cfg, 2, 17), random_tokens(cfg, 2, 17, seed=2)
        tm, jm = build_torch(cfg, state), build_jax(cfg, state)
        lt = tm(tokens)
        dl = float(np.abs(lt.detach().numpy() - np.asarray(jm(tokens))).max())
        F.cross_entropy(lt.reshape(-1, cfg.vocab_size), torch.as_tensor(targets).reshape(-1)).backward()
        _, gj = jax_grads_canonical(jm, tokens, targets)
        named = dict(tm.named_parameters(remove_duplicate=False))
        errors = grad_errors(cfg, {k: p.grad.numpy() for k, p in named.items() if p.grad is not None}, gj)
        dg = max(e for e in errors.values() if e is not None)
        w = worst.setdefault(cfg.attn_mode, {"configs": 0, "logits": 0.0, "grads": 0.0})
        w["configs"] += 1
        w["logits"], w["grads"] = max(w["logits"], dl), max(w["grads"], dg)
    rows = [[m, w["configs"], f"{w['logits']:.1e}", f"{w['grads']:.1e}"] for m, w in worst.items()]
    print_table("Forward/backward, JAX vs torch, fp32 CPU (tolerances: logits 2e-5, grads 1e-4 relative)",
                ["mode", "configs", "max |Δ logits|", "max rel. Δ grad"], rows)

    repo = Path(__file__).resolve().parents[1]  # the shared copy beside the repository, else the repository's
    shared = repo.parent / "shared" / "fixtures" / "v29" / "dec_plain"
    fixture = shared if shared.exists() else repo / "tests" / "fixtures" / "v29" / "dec_plain"
    fix = {}
    if fixture.exists():
        io = np.load(fixture / "io.npz")
        with torch.no_grad():
            fix["torch"] = float(np.abs(torch_ref.load(fixture / "best.pt", device="cpu")(io["tokens"]).numpy() - io["logits"]).max())
        fix["jax"] = float(np.abs(np.asarray(jax_model.load(fixture / "best.pt")(io["tokens"])) - io["logits"]).max())
        print_table("v29 fixture dec_plain (tolerances: torch 1e-5, JAX 2e-5)", ["framework", "max |Δ logits| vs v29"],
                    [[k, f"{v:.1e}"] for k, v in fix.items()])

    dec_rows, dec = [], {}
    kinds = {"fp32": (KVPolicy(kind="fp32"), 1e-5), "fp16": (KVPolicy(kind="fp16"), 2e-5),
             "q8_0": (KVPolicy(kind="q8_0", qblock=8, residual=3), 1e-4),
             "q4_0": (KVPolicy(kind="q4_0", qblock=6, residual=4), 1e-4),
             "nf4": (KVPolicy(kind="nf4", residual=2), 1e-4)}
    for kind, (policy, tol) in kinds.items():
        d_x, d_f = 0.0, 0.0
        for mode, opts in (("decoupled", ("null",)), ("gqa", ()), ("standard", ("tie_qk",)), ("bottleneck", ("embed",))):
            cfg = make_config(mode, opts)
            state = init_like_state(cfg, 12)
            tm, jm = build_torch(cfg, state), build_jax(cfg, state)
            tokens = random_tokens(cfg, 2, 19, seed=5)
            dj = np.asarray(jax_model.decode_logits(jm, tokens, prefill=5, policy=policy, decode_block=6))
            dt = torch_ref.decode_logits(tm, tokens, prefill=5, policy=policy, decode_block=6).numpy()
            d_x = max(d_x, float(np.abs(dj - dt).max()))
            d_f = max(d_f, float(np.abs(dj - np.asarray(jm(tokens))).max()))
        dec[kind] = {"jax_vs_torch": d_x, "vs_full_forward": d_f, "tolerance": tol}
        dec_rows.append([kind, f"{d_x:.1e}", f"{tol:.0e}", f"{d_f:.1e}"])
    print_table("Cached decode (prefill 5, then 14 tokens one by one, window crossed), 4 modes",
                ["cache", "max |Δ| JAX vs torch", "tolerance", "max |Δ| vs full forward (JAX)"], dec_rows)
    write_json(args.json, {"bench": "parity", "model": worst, "v29_fixture": fix, "decode": dec})
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench.common import bench_main

    return bench_main("bench.parity", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
