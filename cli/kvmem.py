"""`dba kv-mem`: KV-cache memory of a model under a cache policy (SPEC §6).

Reports bytes per token per stream and the totals at the model's context, at any `--ctx`, and at
128k tokens, beside the standard-attention fp16 baseline, splitting the saving into what the
attention architecture buys (this attention, fp16 cache vs baseline) and what quantization buys
(this policy vs this attention at fp16). The model comes from v29's flags, a `--size/--exp`
preset, or a checkpoint's config; nothing here imports JAX, and torch only to read a `.pt`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cli.kv_flags import add_kv_arguments
from dba.config import ATTN_MODES, EXPERIMENTS, SIZES, ModelConfig, preset
from dba.errors import UserError
from dba.kvspec import QUANT_KINDS, KVPolicy, baseline_bytes, kv_bytes
from dba.units import human_bytes

CTX_128K = 128_000  # SPEC §6: "128k" means 128,000 tokens

# v29 flag -> ModelConfig field (flags whose names differ from the field are spelled out).
_MODEL_FLAGS = {
    "d_model": "d_model", "layers": "n_layer", "n_head": "n_head", "d_ff": "d_ff",
    "attn_mode": "attn_mode", "attn_dim": "attn_dim", "sem_dim": "sem_dim", "geo_dim": "geo_dim",
    "kv_head": "kv_head", "embed_dim": "embed_dim", "vocab_size": "vocab_size", "block": "block_size",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (v29 flags, a preset, or a checkpoint)")
    m.add_argument("--ckpt", help="v29 .pt, .safetensors export, or a run directory (only its config is read)")
    m.add_argument("--size", choices=list(SIZES), help="v29 size preset")
    m.add_argument("--exp", choices=list(EXPERIMENTS), help="v29 experiment preset")
    for flag in ("d_model", "layers", "n_head", "d_ff", "attn_dim", "sem_dim", "geo_dim", "kv_head",
                 "embed_dim", "vocab_size", "block"):
        m.add_argument("--" + flag.replace("_", "-"), type=int, default=None)
    m.add_argument("--attn-mode", choices=list(ATTN_MODES), default=None)
    m.add_argument("--no-rope", action="store_true", help="model without RoPE (only affects validation)")

    add_kv_arguments(p)

    o = p.add_argument_group("report")
    o.add_argument("--batch", type=int, default=1)
    o.add_argument("--ctx", default="", help="extra contexts, comma separated (e.g. 2048,8192,32k)")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


# ---- inputs ------------------------------------------------------------------------------

def parse_contexts(text: str) -> list[int]:
    """'2048, 8k' -> [2048, 8000] ("k" is 1,000, as in SPEC's 128k)."""
    out = []
    for part in (text or "").split(","):
        s = part.strip().lower().replace("_", "")
        if not s:
            continue
        try:
            n = int(s[:-1]) * 1000 if s.endswith("k") else int(s)
        except ValueError:
            raise UserError(f"--ctx: {part.strip()!r} is not a token count (use e.g. 4096 or 32k)") from None
        if n <= 0:
            raise UserError(f"--ctx: context must be positive, got {n}")
        out.append(n)
    return out


def config_from_checkpoint(path: str) -> ModelConfig:
    from dba.weight_files import read_weights

    return read_weights(path)[0]


def model_config(args: argparse.Namespace) -> ModelConfig:
    overrides = {field: getattr(args, flag) for flag, field in _MODEL_FLAGS.items()
                 if getattr(args, flag, None) is not None}
    if getattr(args, "no_rope", False):
        overrides["rope"] = False
    if args.ckpt:
        flag_of = {field: "--" + flag.replace("_", "-") for flag, field in _MODEL_FLAGS.items()}
        flag_of["rope"] = "--no-rope"
        shape = sorted(flag_of[f] for f in overrides if f != "block_size")
        if args.size or args.exp or shape:
            given = (["--size"] if args.size else []) + (["--exp"] if args.exp else []) + shape
            raise UserError(f"--ckpt fixes the model; drop {', '.join(given)} (only --block may change)")
        cfg = config_from_checkpoint(args.ckpt)
        return cfg.replace(**overrides) if overrides else cfg
    return preset(args.size, args.exp, **overrides)


# ---- report ------------------------------------------------------------------------------

def build_report(cfg: ModelConfig, policy: KVPolicy, batch: int, extra_ctx: list[int]) -> dict[str, Any]:
    contexts = list(dict.fromkeys([cfg.block_size, *extra_ctx, CTX_128K]))
    streams = {}
    for name, dim in cfg.kv_streams().items():
        spec = policy.stream(name, cfg, dim=dim)
        streams[name] = {"kind": spec.kind, "dim": dim, "qblock": spec.qblock_eff if spec.quantized else None,
                         "pad_dim": spec.pad_dim if spec.quantized else None,
                         "n_blocks": spec.n_blocks if spec.quantized else None,
                         "residual": spec.residual, "bytes_per_token": spec.bytes_per_token,
                         "ring_bytes": spec.residual * dim * 2}
    per_layer_tok = sum(s["bytes_per_token"] for s in streams.values())
    base_tok = baseline_bytes(cfg, 1)["per_layer_bytes"]
    arch_tok = kv_bytes(cfg, 1)["per_layer_bytes"]
    rows = []
    for n in contexts:
        base = baseline_bytes(cfg, n, batch)["total_bytes"]
        arch = kv_bytes(cfg, n, batch)["total_bytes"]
        pol = kv_bytes(cfg, n, batch, policy)
        rows.append({
            "ctx": n, "baseline_bytes": base, "attn_fp16_bytes": arch, "policy_bytes": pol["total_bytes"],
            "policy_per_layer_bytes": pol["per_layer_bytes"],
            "human": {"baseline": human_bytes(base), "attn_fp16": human_bytes(arch),
                      "policy": human_bytes(pol["total_bytes"])},
            "ratios": {"architecture": base / arch, "quantization": arch / pol["total_bytes"],
                       "end_to_end": base / pol["total_bytes"]},
        })
    return {
        "config": cfg.to_dict(), "policy": policy.to_dict(), "batch": batch, "streams": streams,
        "bytes_per_token": {"per_layer": per_layer_tok, "model": per_layer_tok * cfg.n_layer,
                            "baseline_per_layer": base_tok, "baseline_model": base_tok * cfg.n_layer,
                            "attn_fp16_model": arch_tok * cfg.n_layer},
        "contexts": rows,
    }


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _ratio(x: float) -> str:
    return f"{x:.2f}×"


def render(rep: dict[str, Any]) -> str:
    c, pol, b = rep["config"], rep["policy"], rep["batch"]
    mode = c["attn_mode"]
    dims = {"decoupled": f"sem {c['sem_dim']} / geo {c['geo_dim']} / attn {c['attn_dim']}",
            "standard": f"width {c['d_model']}", "bottleneck": f"attn {c['attn_dim']}",
            "gqa": f"attn {c['attn_dim']}, kv_head {c['kv_head'] or c['n_head']}"}[mode]
    lines = [f"KV cache memory: {mode} attention ({dims}), d_model {c['d_model']}, {c['n_layer']} layers, "
             f"{c['n_head']} heads, batch {b}",
             f"policy: {pol['kind']} (qblock {pol['qblock']}, residual {pol['residual']})", ""]

    srows = []
    for name, s in rep["streams"].items():
        q = s["kind"] in QUANT_KINDS
        srows.append([name, s["kind"], str(s["dim"]), str(s["qblock"]) if q else "-",
                      str(s["pad_dim"]) if q else "-", str(s["n_blocks"]) if q else "-",
                      str(s["bytes_per_token"]), f"{s['residual']} tok = {human_bytes(s['ring_bytes'])}" if q else "-"])
    t = rep["bytes_per_token"]
    srows.append(["per layer", "", "", "", "", "", str(t["per_layer"]), ""])
    srows.append([f"model ({c['n_layer']} layers)", "", "", "", "", "", str(t["model"]), ""])
    srows.append(["baseline std fp16", "", "", "", "", "", str(t["baseline_model"]), ""])
    lines += _table(["stream", "kind", "dim", "qblock", "pad_dim", "blocks", "bytes/token", "fp16 ring/layer/seq"],
                    srows, {2, 3, 4, 5, 6})
    lines.append("")

    crows = []
    for r in rep["contexts"]:
        x = r["ratios"]
        crows.append([f"{r['ctx']:,}", r["human"]["baseline"], r["human"]["attn_fp16"], r["human"]["policy"],
                      _ratio(x["architecture"]), _ratio(x["quantization"]), _ratio(x["end_to_end"])])
    lines += _table(["context", "baseline std fp16", "this attn fp16", "this policy",
                     "architecture", "quantization", "end-to-end"], crows, {0, 1, 2, 3, 4, 5, 6})
    lines.append("")

    # The seed's summary lines (v29 run_summary.md "KV Cache Memory"), at the model's context.
    first = rep["contexts"][0]
    k128 = next(r for r in rep["contexts"] if r["ctx"] == CTX_128K)
    lines += [f"KV Cache Memory (batch={b})",
              f"- Baseline fp16 (standard attn) @ ctx={first['ctx']}: `{first['human']['baseline']}`",
              f"- This run policy @ ctx={first['ctx']}: `{first['human']['policy']}`",
              f"- Compression vs fp16 baseline: `{_ratio(first['ratios']['end_to_end'])}`",
              f"- This run policy @ 128k: `{k128['human']['policy']}`"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.batch is None or args.batch <= 0:
        raise UserError(f"--batch must be a positive integer, got {args.batch}")
    extra = parse_contexts(args.ctx)
    cfg = model_config(args)
    policy = KVPolicy.from_flags(vars(args))
    rep = build_report(cfg, policy, args.batch, extra)
    text = json.dumps(rep, sort_keys=True) if args.json else render(rep)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `dba kv-mem | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
