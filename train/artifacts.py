"""Run-directory files besides the event log (dba/runlog.py): the environment record and
`summary.md` in the seed run's format (shared/seed/run_summary.md), with the KV-cache memory
section (SPEC §6).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from dba.kvspec import QUANT_KINDS, KVPolicy, baseline_bytes, kv_bytes
from dba.resources import platform_text
from dba.runlog import clean_record
from dba.units import human_bytes


def environment() -> dict[str, Any]:
    import flax
    import jax
    import numpy as np
    import optax
    import orbax.checkpoint as ocp

    devices = jax.devices()
    return {
        "python": sys.version.split()[0], "platform": platform_text(), "jax": jax.__version__,
        "flax": flax.__version__, "optax": optax.__version__, "orbax_checkpoint": ocp.__version__,
        "numpy": np.__version__, "backend": jax.default_backend(), "device_count": len(devices),
        "device_kind": devices[0].device_kind, "host_cpus": os.cpu_count(),
    }


def device_line(env: dict[str, Any]) -> str:
    return f"{env['backend']} ({env['device_kind']} x{env['device_count']})"


def kv_section(cfg, policy: KVPolicy, trained_ctx: int) -> list[str]:
    """The seed's "KV Cache Memory (batch=1)" lines, at block_size (v29's choice), at the longest
    trained context when that differs, and at 128k tokens."""
    lines = [f"- Policy: `{policy_text(policy, cfg)}`"]
    ctxs = [cfg.block_size] + ([trained_ctx] if trained_ctx != cfg.block_size else [])
    for ctx in ctxs:
        this = kv_bytes(cfg, ctx, 1, policy)["total_bytes"]
        try:
            base = baseline_bytes(cfg, ctx, 1)["total_bytes"]
            base_txt, ratio = human_bytes(base), f"{base / this:.2f}×" if this else "n/a"
        except Exception:  # the standard-mode twin of an exotic config may not validate
            base_txt, ratio = "n/a", "n/a"
        which = "block_size" if ctx == cfg.block_size else "longest trained"
        lines += [f"- Baseline fp16 (standard attn) @ ctx={ctx} ({which}): `{base_txt}`",
                  f"- This run policy @ ctx={ctx}: `{human_bytes(this)}`",
                  f"- Compression vs fp16 baseline: `{ratio}`"]
    lines.append(f"- This run policy @ 128k: `{human_bytes(kv_bytes(cfg, 128_000, 1, policy)['total_bytes'])}`")
    return lines


def policy_text(policy, cfg) -> str:
    parts = []
    for name in cfg.kv_streams():
        kind, qb = policy.resolve(name, cfg.attn_mode)
        parts.append(f"{name}={kind}" + (f"/qb{qb}" if kind in QUANT_KINDS else ""))
    if any(policy.resolve(n, cfg.attn_mode)[0] in QUANT_KINDS for n in cfg.kv_streams()):
        parts.append(f"residual={policy.residual}")
    return ", ".join(parts)


def write_summary(out_dir: str | Path, *, created: str, command: str, env: dict[str, Any], cfg,
                  flags: dict[str, Any], policy: KVPolicy, results: dict[str, Any], context: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    best = results.get("best_val")
    best_txt = (f"`{best:.6f}` (ppl `{math.exp(min(best, 700)):.2f}`)" if best is not None and math.isfinite(best)
                else "`n/a` (no evaluation after step 0)")
    files = [n for n in ("train.jsonl", "best.safetensors", "last.safetensors", "checkpoints/")
             if (out_dir / n.rstrip("/")).exists()]
    growth = (f"grown from {context['requested_block_size']} to {context['block_size']} "
              f"(longest trained length {context['longest_train_len']})" if context.get("grown")
              else f"{context['block_size']} (longest trained length {context['longest_train_len']})")
    lines = [
        "# Run Summary", "",
        f"- Created: `{created}`",
        f"- Out dir: `{out_dir}`",
        f"- Device: `{device_line(env)}`",
        f"- Command: `{command}`", "",
        "## Model Config", "", "```json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True), "```", "",
        "## Training Args", "", "```json", json.dumps(clean_record(flags), indent=2, sort_keys=True), "```", "",
        "## Results", "",
        f"- Last step: `{results.get('step')}`",
        f"- Best val loss: {best_txt}",
        f"- Stop reason: `{results.get('reason')}`",
        f"- Context (block_size): {growth}",
        f"- Sequence lengths: {', '.join(f'{L}@{s}' for s, L in context.get('boundaries', []))}",
        f"- Wall time: `{results.get('wall_s', 0.0):.1f}s`",
        f"- Files: {', '.join(f'`{n}`' for n in files)}", "",
        "## KV Cache Memory (batch=1)", "",
        *kv_section(cfg, policy, int(context.get("longest_train_len", cfg.block_size))), "",
    ]
    path = out_dir / "summary.md"
    tmp = path.with_name("summary.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path
