"""Figures drawn from `train.jsonl` alone: a run's `analysis.png` and the convergence plot of
`dba report --plot`. Uses matplotlib's object API with the Agg canvas (no pyplot state, no
display needed) and writes through a temporary file, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _new_figure(w: float, h: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def _series(events: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for e in events:
        if e.get("event") == kind and isinstance(e.get(key), (int, float)):
            xs.append(int(e["step"]))
            ys.append(float(e[key]))
    return xs, ys


def _panel(ax, events, title: str, lines: list[tuple[str, str, str]], *, log: bool = False,
           ylabel: str | None = None) -> None:
    drawn = False
    for kind, key, label in lines:
        xs, ys = _series(events, kind, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 and kind != "train" else None, ms=3, lw=1.2, label=label)
            drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if drawn:
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")


GRAD_GROUPS = ("total", "embed", "attn", "ffn", "attn_sem", "attn_geo")


def plot_run(events: list[dict[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Draw a run's curves (loss, validation, lr, tokens/s, grad norms, analysis metrics)."""
    # fixed margins: a constrained layout would double the time of a figure that every
    # evaluation of every run redraws
    fig = _new_figure(15, 8.5, layout=None)
    fig.subplots_adjust(left=0.045, right=0.99, bottom=0.065, top=0.91 if title else 0.95, wspace=0.25, hspace=0.35)
    axes = fig.subplots(2, 4).ravel()
    _panel(axes[0], events, "loss", [("train", "loss", "train (step)"), ("eval", "train_loss", "train (eval)"),
                                     ("eval", "val_loss", "val")])
    _panel(axes[1], events, "learning rate", [("train", "lr", "lr")])
    _panel(axes[2], events, "throughput", [("train", "tok_s", "tokens/s")])
    _panel(axes[3], events, "gradient norm by group",
           [("train", f"grad_norm_{g}", g) for g in GRAD_GROUPS], log=True)
    _panel(axes[4], events, "attention entropy (nats)", [("analysis", "attn_entropy_mean", "entropy")])
    _panel(axes[5], events, "attention mass", [("analysis", "attn_topk_mass_mean", "top-k"),
                                               ("analysis", "attn_local_mass_mean", "local window"),
                                               ("analysis", "attn_null_mass_mean", "null key")])
    _panel(axes[6], events, "score energy share (decoupled)", [("analysis", "sem_energy_ratio_mean", "semantic"),
                                                               ("analysis", "geo_energy_ratio_mean", "geometric")])
    _panel(axes[7], events, "ranks", [("analysis", "attn_erank_mean", "attention eff. rank"),
                                      ("analysis", "proj_stable_rank_mean", "Q proj. stable rank")])
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out)


def plot_convergence(runs: list[tuple[str, list[dict[str, Any]]]], out: str | Path) -> Path:
    """Validation loss (solid) and training loss (faint) of several runs on shared axes."""
    fig = _new_figure(9, 5.5)
    ax = fig.subplots()
    for i, (label, events) in enumerate(runs):
        color = f"C{i % 10}"
        xs, ys = _series(events, "train", "loss")
        if xs:
            ax.plot(xs, ys, color=color, alpha=0.25, lw=1)
        xs, ys = _series(events, "eval", "val_loss")
        if xs:
            ax.plot(xs, ys, color=color, marker="o", ms=3, lw=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (val solid, train faint)")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_pareto(records: list[dict[str, Any]], out: str | Path, title: str | None = None,
                teacher: str | None = None) -> Path:
    """`dba eval --plot`: KV-cache bytes per token against delta_nll, one labelled point per
    policy (the ppl records of the first context; a line per context when there are several).
    With a teacher (`--teacher`, records carrying its fields) the y axis is delta_nll against the
    teacher's fp16 cache and the teacher is its own point at (its bytes per token, 0)."""
    ppl = [r for r in records if r.get("task") == "ppl"] or [r for r in records if r.get("task") == "extrapolate"]
    if not ppl:
        raise ValueError("the evaluation has no ppl records to plot")
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for ctx in sorted({r["ctx"] for r in ppl}):
        rows = sorted((r for r in ppl if r["ctx"] == ctx), key=lambda r: r["kv_bytes"])
        vs_teacher = all("delta_nll_teacher" in r for r in rows)
        xs = [r["kv_bytes"] / ctx for r in rows]
        ys = [r["delta_nll_teacher" if vs_teacher else "delta_nll"] for r in rows]
        ax.plot(xs, ys, marker="o", linestyle=":", label=f"ctx {ctx}")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["policy"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if vs_teacher:
            tx = rows[0]["teacher_kv_bytes"] / ctx
            ax.plot([tx], [0.0], marker="*", markersize=12, linestyle="none", color="black",
                    label=f"teacher{' ' + teacher if teacher else ''} (fp16 cache), ctx {ctx}")
    with_teacher = all("delta_nll_teacher" in r for r in ppl)
    ax.set_xscale("log")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("KV cache bytes per token (all layers, batch 1)")
    ax.set_ylabel("delta NLL vs the teacher (nats)" if with_teacher else "delta NLL vs fp32 cache (nats)")
    ax.set_title(title or "cache policies: memory vs quality")
    ax.legend(fontsize=8)
    return _save(fig, out)
