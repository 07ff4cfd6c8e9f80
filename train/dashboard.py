"""The live dashboard of `dba train --live rich` (the default on a terminal).

One rich `Live` region below the scrolling event lines: a progress bar, then panels with the
latest train metrics (loss, lr, tokens/s, gradient norms by group), the latest evaluation, the
step-time breakdown (host data, train step, last eval, compile), memory (host RSS; device memory
where the platform reports it) and the last analysis metrics.

It never syncs the device: it only shows what the loop already fetched at log/eval/analysis
steps, and redraws on the loop's thread (no refresh thread competing with XLA for the cores)
at most every `--live-update-every` steps and at each event.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dba.resources import host_rss_bytes
from dba.units import human_bytes
from train.progress import ANALYSIS_SHORT, Display, analysis_line, eval_line, fmt_tok

# Redraws are capped at 2/s however small --live-update-every is: one costs ~10 ms of the
# loop thread on a 2-core CPU (`dba bench dashboard`), which at 10/s cost ~20% of tokens/s.
_MIN_REDRAW_S = 0.5


def _bytes(x: float | None) -> str:
    return "-" if x is None else human_bytes(x, "iec")


def _kv_table(rows: list[tuple[str, str]]) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="dim")
    t.add_column(justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


class Dashboard(Display):
    def __init__(self, mode: str, total: int, start: int = 0, console: Console | None = None,
                 device_memory: Callable[[], dict[str, Any] | None] | None = None):
        super().__init__(mode, total, start)
        self.device_memory = device_memory  # the stepper's allocator reading (cheap, no sync)
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("train", total=total, completed=start)
        self.last_train: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.last_analysis: dict[str, Any] | None = None
        self.timing: dict[str, float] = {}
        self._t_draw = 0.0
        self.live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
        self.live.start()

    # -- rendering --------------------------------------------------------------------------
    def _train_panel(self) -> Panel:
        m = self.last_train
        if m is None:
            return Panel("waiting for the first log step", title="train", border_style="dim")
        ppl = "-" if m.get("ppl") is None else f"{m['ppl']:.2f}"  # none in distillation's blockwise phase
        rows = [("step", f"{m['step']}/{self.total}"), ("loss", f"{m['loss']:.4f}"), ("ppl", ppl),
                ("lr", f"{m['lr']:.2e}"), ("tokens/s", fmt_tok(m["tok_s"])), ("seq len", str(m["seq_len"]))]
        rows += [(f"|g| {k[10:]}", f"{v:.3g}") for k, v in m.items() if k.startswith("grad_norm_") and v is not None]
        return Panel(_kv_table(rows), title="train")

    def _eval_panel(self) -> Panel:
        e = self.last_eval
        if e is None:
            return Panel("no evaluation yet", title="eval", border_style="dim")
        rows = [("step", str(e["step"])), ("val loss", f"{e['val_loss']:.4f}"), ("val ppl", f"{e['val_ppl']:.2f}"),
                ("train loss", f"{e['train_loss']:.4f}" if e.get("train_loss") is not None else "-"),
                ("best val", f"{e['best_val']:.4f}" if e.get("best_val") is not None else "-")]
        return Panel(_kv_table(rows), title="eval")

    def _time_panel(self) -> Panel:
        m = self.last_train or {}
        rows = [("data / step", f"{m['data_ms']:.1f} ms" if "data_ms" in m else "-"),
                ("train step", f"{m['step_ms']:.0f} ms" if "step_ms" in m else "-"),
                ("last eval", f"{self.timing['eval_s']:.2f} s" if "eval_s" in self.timing else "-"),
                ("last analysis", f"{self.timing['analysis_s']:.2f} s" if "analysis_s" in self.timing else "-"),
                ("compile", f"{self.timing['compile_s']:.1f} s" if "compile_s" in self.timing else "-")]
        return Panel(_kv_table(rows), title="time")

    def _memory_panel(self) -> Panel:
        rss, peak = host_rss_bytes()
        rows = [("host RSS", _bytes(rss)), ("host peak", _bytes(peak))]
        dev = self.device_memory() if self.device_memory is not None else None
        if dev is not None:
            rows += [("device in use", _bytes(dev.get("bytes_in_use"))), ("device peak", _bytes(dev.get("peak_bytes_in_use"))),
                     ("device limit", _bytes(dev.get("bytes_limit")))]
        else:
            rows.append(("device", "not reported"))
        return Panel(_kv_table(rows), title="memory")

    def _analysis_panel(self) -> Panel:
        a = self.last_analysis
        if a is None:
            return Panel("no analysis (--instrument off or not yet run)", title="analysis", border_style="dim")
        rows = [(short, f"{a[k]:.3f}") for k, short in ANALYSIS_SHORT if isinstance(a.get(k), (int, float))]
        return Panel(_kv_table(rows), title=f"analysis @ {a['step']}")

    def _render(self) -> Group:
        grid = Table.grid(expand=True)
        for _ in range(5):
            grid.add_column(ratio=1)
        grid.add_row(self._train_panel(), self._eval_panel(), self._time_panel(), self._memory_panel(),
                     self._analysis_panel())
        return Group(self.progress, grid)

    def _redraw(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._t_draw >= _MIN_REDRAW_S:
            self._t_draw = now
            self.live.update(self._render(), refresh=True)

    # -- the Display interface --------------------------------------------------------------
    def _print(self, text: str, **kw) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True, **kw)

    def line(self, text: str) -> None:
        self._print(text)

    def info(self, text: str) -> None:
        self._print(text, style="dim")

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)
        self._redraw()

    def train(self, m: dict[str, Any]) -> None:
        self.last_train = m
        self.progress.update(self.task, completed=m["step"])
        self._redraw(force=True)

    def eval(self, e: dict[str, Any]) -> None:
        self.last_eval = e
        self._print(eval_line(e))
        self._redraw(force=True)

    def analysis(self, a: dict[str, Any]) -> None:
        self.last_analysis = a
        self._print(analysis_line(a), style="dim")
        self._redraw(force=True)

    def set_timing(self, **values: float) -> None:
        self.timing.update(values)

    def close(self) -> None:
        if self.live is not None:
            self._redraw(force=True)
            self.live.stop()
            self.live = None


def make_display(mode: str, total: int, start: int = 0,
                 device_memory: Callable[[], dict[str, Any] | None] | None = None) -> Display:
    """`--live`: auto = this dashboard on a terminal, plain lines (train/progress.py) when piped."""
    if mode == "auto":
        mode = "rich" if sys.stdout.isatty() else "basic"
    if mode == "rich":
        return Dashboard(mode, total, start, device_memory=device_memory)
    return Display(mode, total, start)
