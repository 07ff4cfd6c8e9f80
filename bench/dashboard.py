"""`dba bench dashboard`: what the live rich dashboard costs a training run.

Two measurements:
1. one redraw of the dashboard (all panels, rendered for a 200-column terminal) in ms;
2. the same short `dba train` run with `--live rich` on a pseudo-terminal and with `--live off`,
   alternated `--repeats` times; steady tokens/s (median of the log steps after the first) of each.
"""

from __future__ import annotations

import argparse
import io
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, positive_int, print_table, write_json
from train.dashboard import _MIN_REDRAW_S

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=150, help="train steps per run (default 150)")
    p.add_argument("--repeats", type=positive_int, default=2, help="runs per display mode, alternated (default 2)")
    p.add_argument("--redraws", type=positive_int, default=300, help="redraws timed for the per-redraw cost")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")


def redraw_ms(n: int) -> float:
    from rich.console import Console

    from train.dashboard import Dashboard

    buf = io.StringIO()
    d = Dashboard("rich", 1000, 0, console=Console(file=buf, force_terminal=True, width=200, height=50))
    rec = {"step": 10, "loss": 3.21, "ppl": 24.8, "lr": 2e-3, "tok_s": 5000.0, "seq_len": 128, "step_ms": 120.0,
           "data_ms": 0.3, **{f"grad_norm_{g}": 0.5 for g in ("total", "embed", "attn", "ffn", "attn_sem", "attn_geo")}}
    d.train(rec)
    d.eval({"step": 10, "val_loss": 3.3, "val_ppl": 27.1, "train_loss": 3.2, "best_val": 3.3})
    d.analysis({"step": 10, "attn_entropy_mean": 2.0, "attn_topk_mass_mean": 0.5, "sem_energy_ratio_mean": 0.3})
    t0 = time.perf_counter()
    for i in range(n):
        d.advance(11 + i)
        d._redraw(force=True)
    dt = (time.perf_counter() - t0) / n
    d.close()
    return 1000.0 * dt


def _run(out: Path, live: str, steps: int) -> float:
    cmd = [sys.executable, "-m", "cli", "train", "--steps", str(steps), "--eval-every", "0", "--log-every", "10",
           "--live", live, "--out-dir", str(out), "--overwrite"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="200", LINES="50")
    if live == "rich":  # a real terminal, so rich animates as it would for a user
        master, slave = pty.openpty()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        while True:  # drain the terminal (a full pty buffer would block the run)
            try:
                if not os.read(master, 65536):
                    break
            except OSError:  # EIO: the child closed the terminal
                break
        code = proc.wait()
        os.close(master)
    else:
        code = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True).returncode
    if code != 0:
        raise RuntimeError(f"dba train --live {live} exited {code}")
    from dba.runlog import read_events

    rates = [e["tok_s"] for e in read_events(out / "train.jsonl", "train")][1:]
    return statistics.median(rates)


def run(args: argparse.Namespace) -> int:
    per = redraw_ms(args.redraws)
    results: dict[str, list[float]] = {"off": [], "rich": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for live in ("off", "rich") if i % 2 == 0 else ("rich", "off"):
                results[live].append(_run(Path(tmp) / live, live, args.steps))
                print(f"  run {i + 1}/{args.repeats} --live {live}: {results[live][-1]:,.0f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    overhead = 100.0 * (med["off"] - med["rich"]) / med["off"]
    print_table("Live dashboard overhead (`dba train` default recipe)", ["measure", "value"], [
        ["one redraw (all panels)", f"{per:.2f} ms"],
        ["redraws per second (cap)", f"{1 / _MIN_REDRAW_S:g}"],
        ["--live off: tokens/s (median)", f"{med['off']:,.0f}"],
        ["--live rich on a pty: tokens/s (median)", f"{med['rich']:,.0f}"],
        ["overhead", f"{overhead:+.1f}%"],
    ])
    write_json(args.json, {"bench": "dashboard", "machine": machine(), "redraw_ms": per, "tok_s": results,
                           "median_tok_s": med, "overhead_pct": overhead, "steps": args.steps})
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
