"""Live display for `dba train`: `--live auto|rich|basic|off`.

auto = a rich progress bar (step, loss, tok/s, ETA) on a terminal, plain lines when piped;
basic = plain lines at every log step; off = only the start and end lines (and errors).
The loop calls `advance` at most every `--live-update-every` steps and passes metrics only at
log steps, so the display never forces a device sync of its own.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _fmt_tok(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:.0f}"


def train_line(m: dict[str, Any], total: int) -> str:
    return (f"step {m['step']:>{len(str(total))}}/{total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"{_fmt_tok(m['tok_s'])} tok/s | seq {m['seq_len']} | {m['step_ms']:.0f} ms/step | "
            f"gnorm {m['grad_norm_total']:.3f}")


def eval_line(e: dict[str, Any]) -> str:
    tl = e.get("train_loss")
    tl_txt = f"train {tl:.4f} | " if tl is not None else ""
    best = e.get("best_val")
    best_txt = f" | best {best:.4f}" if best is not None else ""
    return f"eval @ {e['step']}: {tl_txt}val {e['val_loss']:.4f} (ppl {e['val_ppl']:.2f}){best_txt}"


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

    def close(self) -> None:
        pass


class RichDisplay(Display):
    """A rich progress bar with the latest loss and tok/s; events print above it."""

    def __init__(self, mode: str, total: int, start: int = 0):
        super().__init__(mode, total, start)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"),
            TextColumn("seq {task.fields[seq]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False, refresh_per_second=4,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", tok_s="-", seq="-")
        self.progress.start()
        self._t_last = time.monotonic()

    def _print(self, text: str, **kw) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True, **kw)

    def line(self, text: str) -> None:
        self._print(text)

    def info(self, text: str) -> None:
        self._print(text, style="dim")

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def train(self, m: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=m["step"], loss=f"{m['loss']:.4f}",
                             tok_s=_fmt_tok(m["tok_s"]), seq=m["seq_len"])

    def eval(self, e: dict[str, Any]) -> None:
        self._print(eval_line(e))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def make_display(mode: str, total: int, start: int = 0) -> Display:
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "basic"
    if mode == "rich":
        try:
            return RichDisplay(mode, total, start)
        except ImportError:
            mode = "basic"
    return Display(mode, total, start)
