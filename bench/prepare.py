"""`dba bench prepare`: how fast `dba prepare` tokenizes, per core, and the memory it holds.

Each case runs `dba prepare` in a fresh process on the same input: the byte tokenizer and a BPE
(a bpe:N tokenizer.json trained once on the input first, so the timed runs only tokenize), with
1 worker (tokenizing in the main process: MB/s per core) and with --workers N. The table gives
MB/s of text (wall clock), MB/s per core (text over the CPU seconds of the main process and its
workers together: the figure that does not move when a shared machine is busy), tokens/s, and
the peak resident set of the main process and of the largest worker (VmHWM / RUSAGE_CHILDREN),
which stay bounded whatever the input size. The interpreter's start-up is not timed; starting
the workers (a fresh interpreter each) is, with the reading, tokenizing and writing.

The input is this Python's standard library (`--corpus python-stdlib`, ~12 MB), or `--src`
files, or `--make-jsonl MB`: a JSONL of that many MB written from the standard library's files
(repeated), the way to see the memory stay flat on a multi-GB input. A case under 1 s is
repeated until it has run for 1 s, best time kept.

    dba bench prepare                                  # stdlib corpus: byte and bpe:8192, 1 and all workers
    dba bench prepare --make-jsonl 1500 --repeat-min-s 0 --json out.json   # a 1.5 GB JSONL (deleted after)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import bench_main, machine, positive_int, print_table, write_json

# dba prepare through its Python API; then the seconds, the sidecar and the peak RSS of this
# process and of its largest child (a worker), as JSON on the last line
_REPORTING_PREPARE = (
    "import json, resource, sys, time\n"
    "from dba.prepare import Options, prepare\n"
    "opts = Options(**json.loads(sys.argv[1]))\n"
    "def cpu(who):\n"
    "    u = resource.getrusage(who)\n"
    "    return u.ru_utime + u.ru_stime\n"
    "t0, cpu0 = time.perf_counter(), cpu(resource.RUSAGE_SELF)\n"
    "side = prepare(opts)\n"
    "took = time.perf_counter() - t0\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "used = cpu(resource.RUSAGE_SELF) - cpu0 + cpu(resource.RUSAGE_CHILDREN)  # the workers, all ended\n"
    "print(json.dumps({'seconds': took, 'cpu_seconds': used, 'text_bytes': side['text_bytes'], 'tokens': side['tokens'],\n"
    "                  'val_tokens': (side.get('val') or {}).get('tokens', 0), 'documents': side['documents'],\n"
    "                  'main_rss': int(hwm[0].split()[1]) * 1024 if hwm else None, 'worker_rss': child}))\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src", nargs="+", default=None, help="sources to prepare (default: the python-stdlib corpus)")
    p.add_argument("--make-jsonl", type=positive_int, default=None, metavar="MB",
                   help="write a JSONL of this many MB from the standard library's files and prepare that")
    p.add_argument("--bpe", type=positive_int, default=8192, help="vocabulary of the BPE case (trained first)")
    p.add_argument("--tokenizers", default="byte,bpe", help="cases: byte, bpe, or both (comma-separated)")
    p.add_argument("--workers", default=None,
                   help="worker counts to measure, comma-separated (default: 1 and the cores)")
    p.add_argument("--bpe-tokenizer", default=None, metavar="PATH",
                   help="the BPE case's tokenizer.json (default: train bpe:N on the input first)")
    p.add_argument("--repeat-min-s", type=float, default=1.0,
                   help="repeat a case until it has run this long (best time kept)")
    p.add_argument("--dir", default=None, help="where to write the input and outputs (default: a temporary dir)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")


def make_jsonl(path: Path, megabytes: int) -> int:
    """A JSONL of about `megabytes` MB: the standard library's files as documents, over and over
    (each copy numbered, so no two documents are equal)."""
    from dba.stdlib_corpus import stdlib_files

    texts = [Path(p).read_text(encoding="utf-8", errors="replace") for p, _ in stdlib_files()]
    target, written, copy = megabytes * 10**6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for i, t in enumerate(texts):
                line = json.dumps({"text": f"# copy {copy} file {i}\n{t}", "id": f"{copy}-{i}"}) + "\n"
                f.write(line)
                written += len(line)
                if written >= target:
                    break
            copy += 1
    return path.stat().st_size


def _prepare(opts: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _REPORTING_PREPARE, json.dumps(opts)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"dba bench prepare: the prepare process failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _case(base: dict, tokenizer: str, workers: int, min_s: float) -> dict:
    best, spent, runs = None, 0.0, 0
    while best is None or spent < min_s:
        got = _prepare({**base, "tokenizer": tokenizer, "workers": workers, "overwrite": True})
        spent, runs = spent + got["seconds"], runs + 1
        if best is None or got["seconds"] < best["seconds"]:
            best = {**got, "main_rss": max(got["main_rss"] or 0, (best or {}).get("main_rss") or 0),
                    "worker_rss": max(got["worker_rss"], (best or {}).get("worker_rss") or 0)}
    return {**best, "runs": runs}


def run(args: argparse.Namespace) -> int:
    from dba.prepare import cores

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dba-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        counts = [int(w) for w in args.workers.split(",")] if args.workers else [1, cores()]
    except ValueError:
        counts = [0]
    if min(counts) < 1:
        raise SystemExit(f"dba bench prepare: --workers {args.workers!r}: positive integers, comma-separated")
    workers = max(counts)
    kinds = [k.strip() for k in args.tokenizers.split(",") if k.strip()]
    if not kinds or set(kinds) - {"byte", "bpe"}:
        raise SystemExit(f"dba bench prepare: --tokenizers {args.tokenizers!r}: choose byte, bpe or byte,bpe")
    try:
        base: dict = {"sources": [], "out": str(root / "out.npy"), "val_frac": None}
        source = "python-stdlib corpus"
        if args.make_jsonl:
            t0 = time.perf_counter()
            size = make_jsonl(root / "input.jsonl", args.make_jsonl)
            print(f"wrote {root / 'input.jsonl'}: {size / 1e6:,.0f} MB in {time.perf_counter() - t0:.0f} s")
            base["sources"], source = [str(root / "input.jsonl")], f"generated JSONL, {size / 1e6:,.0f} MB"
        elif args.src:
            base["sources"], source = list(args.src), " ".join(args.src)
        else:
            base["corpus"] = "python-stdlib"
            base["val_frac"] = 0.0
        rows, results = [], []
        for kind in kinds:
            tok = "byte"
            if kind == "bpe" and args.bpe_tokenizer:
                tok = args.bpe_tokenizer
            elif kind == "bpe":
                t0 = time.perf_counter()
                _prepare({**base, "out": str(root / "bpe.npy"), "tokenizer": f"bpe:{args.bpe}", "workers": workers,
                          "overwrite": True})
                trained = time.perf_counter() - t0
                tok = str(root / "bpe.tokenizer.json")
                print(f"bpe:{args.bpe}: trained and tokenized once in {trained:.1f} s ({workers} workers)")
            for w in dict.fromkeys(counts):
                r = _case(base, tok, w, args.repeat_min_s)
                mb = r["text_bytes"] / 1e6
                name = "byte" if kind == "byte" else f"bpe:{args.bpe}" if not args.bpe_tokenizer else "bpe"
                r.update(tokenizer=name, workers=w,
                         mb_per_s=mb / r["seconds"], mb_per_cpu_s=mb / r["cpu_seconds"],
                         tokens_per_s=(r["tokens"] + r["val_tokens"]) / r["seconds"])
                results.append(r)
                rows.append([r["tokenizer"], w, f"{mb:,.1f}", f"{r['tokens'] + r['val_tokens']:,}",
                             f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}", f"{r['mb_per_s']:,.1f}",
                             f"{r['mb_per_cpu_s']:,.1f}",
                             f"{r['tokens_per_s'] / 1e6:,.2f}M", f"{r['main_rss'] / 2**20:,.0f} MiB",
                             f"{r['worker_rss'] / 2**20:,.0f} MiB" if w > 1 else "-"])
        print_table(f"dba prepare throughput: {source}, {os.cpu_count()} cores",
                    ["tokenizer", "workers", "text MB", "tokens", "s", "CPU s", "MB/s", "MB/s per core", "tokens/s",
                     "peak RSS main", "peak RSS worker"], rows)
        write_json(args.json, {"source": source, "results": results, "machine": machine()})
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.prepare", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
