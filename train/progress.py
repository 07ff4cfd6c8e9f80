"""The plain-line display of `dba train` (`--live basic|off`) and the line formats the rich
dashboard (train/dashboard.py, `--live rich`; `make_display` there picks one) shares.

basic = plain lines at every log step; off = only the start and end lines (and errors).
The loop calls `advance` at most every `--live-update-every` steps and passes metrics only at
log steps, so the display never forces a device sync of its own.
"""

from __future__ import annotations

from typing import Any


def fmt_tok(x: float) -> str:
    """Tokens/s as the display shows them: 9,876 -> '9876', 12,345 -> '12.3k'."""
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.0f}"


def train_line(m: dict[str, Any], total: int) -> str:
    return (f"step {m['step']:>{len(str(total))}}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"{fmt_tok(m['tok_s'])} tok/s | seq {m['seq_len']} | {m['step_ms']:.0f} ms/step | "
            f"gnorm {m['grad_norm_total']:.3f}")


def eval_line(e: dict[str, Any]) -> str:
    tl = e.get("train_loss")
    tl_txt = f"train {tl:.4f} | " if tl is not None else ""
    best = e.get("best_val")
    best_txt = f" | best {best:.4f}" if best is not None else ""
    return f"eval @ {e['step']}: {tl_txt}val {e['val_loss']:.4f} (ppl {e['val_ppl']:.2f}){best_txt}"


ANALYSIS_SHORT = (("attn_entropy_mean", "entropy"), ("attn_topk_mass_mean", "top-k"),
                  ("attn_local_mass_mean", "local"), ("attn_null_mass_mean", "null"),
                  ("sem_energy_ratio_mean", "sem"), ("geo_energy_ratio_mean", "geo"),
                  ("attn_erank_mean", "erank"), ("proj_stable_rank_mean", "q-srank"))


def analysis_line(a: dict[str, Any]) -> str:
    parts = [f"{short} {a[k]:.3f}" for k, short in ANALYSIS_SHORT if isinstance(a.get(k), (int, float))]
    return f"analysis @ {a['step']}: " + " | ".join(parts)


class Display:
    """Plain lines (mode basic) or nothing but start/end (mode off)."""

    def __init__(self, mode: str, total: int, start: int = 0):
        self.mode, self.total, self.start = mode, total, start

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def line(self, text: str) -> None:  # start/end lines and errors: always shown
        print(text, flush=True)

    def info(self, text: str) -> None:  # announcements (compiles, context growth, saves)
        if self.mode != "off":
            print(text, flush=True)

    def advance(self, step: int) -> None:
        pass

    def train(self, m: dict[str, Any]) -> None:
        if self.mode != "off":
            print(train_line(m, self.total), flush=True)

    def eval(self, e: dict[str, Any]) -> None:
        if self.mode != "off":
            print(eval_line(e), flush=True)

    def analysis(self, a: dict[str, Any]) -> None:
        if self.mode != "off":
            print(analysis_line(a), flush=True)

    def set_timing(self, **values: float) -> None:  # the dashboard shows these; lines do not
        pass

    def close(self) -> None:
        pass
