"""`dba report RUN [RUN...]`: compare training runs from their `train.jsonl`.

    dba report runs/default                      # one run's table; redraws runs/default/analysis.png
    dba report runs/dec_s1 runs/dec_s2 runs/std  # + mean ± std for runs that differ only by seed
    dba report runs/* --json                     # machine-readable
    dba report runs/a runs/b --plot conv.png     # convergence plot of all runs

Per run: attention mode and dims, parameters, best val loss and ppl, KV cache (batch 1, the run's
cache policy) at the longest trained context and at 128k tokens, and the steady tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dba.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (__doc__ or "").split("\n\n")[0]
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or their train.jsonl)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--plot", metavar="OUT.png", help="write a convergence plot (val loss vs step) of all runs")
    p.add_argument("--no-redraw", action="store_true", help="do not redraw each run's analysis.png")


def run(args: argparse.Namespace) -> int:
    from dba.report import load_run, markdown, summarize, variants

    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise UserError(f"--plot {args.plot!r}: the plot is a PNG; give a name ending in .png", 2)
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise UserError(f"--plot {args.plot!r}: directory {str(Path(args.plot).parent)!r} does not exist", 2)
    runs = [load_run(r) for r in args.runs]
    rows = [summarize(r) for r in runs]
    groups = variants(rows)
    if not args.no_redraw:
        from dba.plots import plot_run

        for r in runs:
            try:
                plot_run(r["events"], r["dir"] / "analysis.png", title=f"{r['dir'].name}: {r['meta']['config']['attn_mode']}")
            except OSError as e:  # a read-only run dir: the table still prints
                print(f"dba report: note: could not redraw {r['dir'] / 'analysis.png'}: {e.strerror}", file=sys.stderr)
    if args.plot:
        from dba.plots import plot_convergence

        plot_convergence([(row["run"], r["events"]) for row, r in zip(rows, runs)], args.plot)
    if args.json:
        out = {"runs": [{k: v for k, v in row.items() if k != "variant_key"} for row in rows],
               "variants": groups}
        print(json.dumps(out, indent=2))
    else:
        sys.stdout.write(markdown(rows, groups))
        if args.plot:
            print(f"\nconvergence plot: {args.plot}")
    return 0
