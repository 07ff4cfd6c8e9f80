"""Run comparison for `dba report`: one row per run directory, and mean ± std over runs that
differ only by seed (the seed suite's summary). Reads `train.jsonl` alone (framework-free).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from dba.config import ModelConfig
from dba.errors import UserError
from dba.kvspec import KVPolicy, baseline_bytes, kv_bytes
from dba.runlog import read_events
from dba.units import human_bytes

CTX_128K = 128_000
# Flags that do not change what a run trains: runs differing only in these are the same variant.
_NOT_VARIANT = {"seed", "out_dir", "run_tag", "run_root", "resume", "overwrite", "live", "live_update_every",
                "log_every", "device", "print_config", "mode", "debug", "instrument", "tb", "live_plot",
                "save_every", "eval_every", "eval_iters", "coordinator", "num_processes", "process_id", "mesh",
                "wandb", "wandb_project", "wandb_entity", "wandb_name", "wandb_group", "wandb_tags", "wandb_mode",
                "wandb_id"}


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The events of one run directory; one-line UserErrors for anything that is not a run."""
    d = Path(run_dir)
    if not d.exists():
        raise UserError(f"run {str(d)!r} does not exist", 2)
    log = d / "train.jsonl" if d.is_dir() else d
    if not log.is_file():
        raise UserError(f"run {str(d)!r} has no train.jsonl (is it a `dba train` run directory?)", 2)
    try:
        events = read_events(log)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"run {str(d)!r}: cannot read {log.name}: {e}", 1) from None
    metas = [e for e in events if e.get("event") == "meta"]
    if not metas or not isinstance(metas[0].get("config"), dict):
        raise UserError(f"run {str(d)!r}: {log.name} has no meta event with the model config", 2)
    return {"dir": d if d.is_dir() else d.parent, "events": events, "meta": metas[-1]}


def attention_dims(cfg: ModelConfig) -> str:
    if cfg.attn_mode == "decoupled":
        return f"sem {cfg.sem_dim} / geo {cfg.geo_dim} / v {cfg.attn_dim}"
    if cfg.attn_mode == "gqa":
        return f"qk {cfg.qk_dim} / v {cfg.v_dim} / kv heads {cfg.n_kv_head}"
    return f"qk {cfg.qk_dim} / v {cfg.v_dim}"


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    meta, events = run["meta"], run["events"]
    cfg = ModelConfig.from_dict(meta["config"])
    flags = dict(meta.get("flags") or {})
    ctx = int((meta.get("context") or {}).get("longest_train_len") or cfg.block_size)
    try:
        policy = KVPolicy.from_flags(flags)
    except Exception as e:  # noqa: BLE001 (a policy the KV module rejects is reported, not fatal)
        raise UserError(f"run {str(run['dir'])!r}: its KV-cache flags do not form a policy: {e}", 1) from None
    evals = [e for e in events if e.get("event") == "eval" and isinstance(e.get("val_loss"), (int, float))]
    best = min(evals, key=lambda e: e["val_loss"]) if evals else None
    tok_s = [e["tok_s"] for e in events if e.get("event") == "train" and isinstance(e.get("tok_s"), (int, float))]
    done = [e for e in events if e.get("event") == "done"]
    kv_ctx = kv_bytes(cfg, ctx, 1, policy)["total_bytes"]
    try:
        base_ctx = baseline_bytes(cfg, ctx, 1)["total_bytes"]
    except Exception:  # noqa: BLE001 (the standard twin of an exotic config may not validate)
        base_ctx = None
    return {
        "run": run["dir"].name, "path": str(run["dir"]), "attn_mode": cfg.attn_mode, "attn_dims": attention_dims(cfg),
        "params": cfg.num_params(), "seed": flags.get("seed"),
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_ppl": math.exp(min(best["val_loss"], 700.0)) if best else None,
        "best_step": best["step"] if best else None,
        "last_step": max((e.get("step", 0) for e in events if e.get("event") in ("train", "eval")), default=0),
        "finished": done[-1].get("reason") if done else None,
        "trained_ctx": ctx, "kv_policy": policy.to_dict(),
        "kv_bytes_ctx": kv_ctx, "kv_bytes_128k": kv_bytes(cfg, CTX_128K, 1, policy)["total_bytes"],
        "kv_baseline_bytes_ctx": base_ctx,
        # the first log step includes warm-up; the median of the rest is the steady rate
        "tok_s": statistics.median(tok_s[1:] if len(tok_s) > 1 else tok_s) if tok_s else None,
        "variant_key": json.dumps({"config": meta["config"],
                                   "flags": {k: v for k, v in sorted(flags.items()) if k not in _NOT_VARIANT}},
                                  sort_keys=True, default=str),
    }


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def variants(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of runs identical but for the seed (and presentation flags), in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["variant_key"], []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        entry = {"variant": f"{first['attn_mode']} ({first['attn_dims']})", "runs": [m["run"] for m in members],
                 "seeds": [m["seed"] for m in members], "n": len(members),
                 "kv_bytes_ctx": first["kv_bytes_ctx"], "kv_bytes_128k": first["kv_bytes_128k"]}
        for key in ("best_val_loss", "best_val_ppl", "tok_s"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([m[key] for m in members])
        out.append(entry)
    return out


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _pm(mean: float | None, std: float | None, spec: str) -> str:
    return "-" if mean is None else f"{format(mean, spec)} ± {format(std, spec)}"


def markdown(rows: list[dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    lines = ["## Runs", "",
             "| run | attention | dims | params | best val loss | ppl | KV @ trained ctx | vs std fp16 | KV @ 128k | tokens/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = (f"{r['kv_baseline_bytes_ctx'] / r['kv_bytes_ctx']:.2f}×"
                 if r["kv_baseline_bytes_ctx"] and r["kv_bytes_ctx"] else "-")
        lines.append(f"| {r['run']} | {r['attn_mode']} | {r['attn_dims']} | {r['params']:,} | "
                     f"{_fmt(r['best_val_loss'], '.4f')} | {_fmt(r['best_val_ppl'], '.2f')} | "
                     f"{human_bytes(r['kv_bytes_ctx'])} ({r['trained_ctx']}) | {ratio} | "
                     f"{human_bytes(r['kv_bytes_128k'])} | {_fmt(r['tok_s'], ',.0f')} |")
    lines.append("")
    lines.append("KV cache: batch 1, each run's own cache policy (fp16 unless it trained with --kv-cache ...); "
                 "128k = 128,000 tokens.")
    if any(g["n"] > 1 for g in groups):
        lines += ["", "## Variants (runs that differ only by seed)", "",
                  "| variant | runs | seeds | best val loss | ppl | tokens/s |", "|---|---:|---|---:|---:|---:|"]
        for g in groups:
            lines.append(f"| {g['variant']} | {g['n']} | {', '.join(str(s) for s in g['seeds'])} | "
                         f"{_pm(g['best_val_loss_mean'], g['best_val_loss_std'], '.4f')} | "
                         f"{_pm(g['best_val_ppl_mean'], g['best_val_ppl_std'], '.2f')} | "
                         f"{_pm(g['tok_s_mean'], g['tok_s_std'], ',.0f')} |")
        lines.append("")
        lines.append("mean ± sample standard deviation over the seeds (± 0 for a single run).")
    return "\n".join(lines) + "\n"
