"""`dba prepare`: text sources -> a token file for `dba train --data`, with its sidecar.

    dba prepare corpus/ --glob '*.txt' --out data/corpus.npy             # byte tokenizer
    dba prepare shards/*.jsonl --tokenizer bpe:8192 --val-frac 0.01 --out data/web.npy
    dba prepare hf_dataset_dir/ --tokenizer tokenizer.json --out data/ds.npy   # datasets.save_to_disk
    dba prepare --corpus python-stdlib --out data/stdlib.npy             # this Python's standard library

Writes OUT.npy (uint16 ids, uint32 past 65,536), OUT.json (the sidecar: tokenizer, vocabulary,
sources, counts), OUT.val.npy with --val-frac, OUT.tokenizer.json with bpe:N. See the README's
Data section.
"""

from __future__ import annotations

import shlex
import sys

from dba.prepare import CORPORA, Options, Progress, cores, prepare
from dba.sources import FORMATS


def add_arguments(p) -> None:
    p.description = (__doc__ or "").split("\n\n")[0]
    p.add_argument("sources", nargs="*", metavar="SRC",
                   help="text files, JSONL, Parquet or Arrow files, directories (walked recursively; with --glob), "
                        "or a directory written by datasets.save_to_disk")
    p.add_argument("--out", required=True, metavar="OUT.npy", help="the token file to write (beside it: OUT.json, "
                   "the sidecar; OUT.val.npy with --val-frac; OUT.tokenizer.json with bpe:N)")
    p.add_argument("--tokenizer", default="byte",
                   help="byte (default; documents end with byte 0x03), bpe:N (train an N-token byte-level BPE on the "
                        "sources), PATH/tokenizer.json (its eos token ends documents), or tiktoken:gpt2")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="how to read every file (auto: by name: .jsonl/.ndjson, .parquet/.pq, .arrow, else text)")
    p.add_argument("--text-field", default="text", help="the JSONL key or table column holding the text")
    p.add_argument("--glob", default=None, metavar="PATTERN",
                   help="files of a directory to read, by name ('*.txt'), or by relative path when the pattern has a /")
    p.add_argument("--workers", type=int, default=None,
                   help=f"tokenizing processes (default: the cores, {cores()} here, but 1 for the byte tokenizer, "
                        f"whose work is cheaper than a hand-off to a process; 1: in this process)")
    p.add_argument("--val-frac", type=float, default=None,
                   help="hold out this fraction of the documents (every 1/F-th) as OUT.val.npy; --corpus "
                        "python-stdlib holds out files (default 0.02)")
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help="build a known corpus instead of SRC: python-stdlib, this Python's standard library sources")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="token dtype (auto: uint16 when the vocabulary fits, else uint32)")
    p.add_argument("--eot", default=None, metavar="TOKEN",
                   help="a tokenizer.json's end-of-text token, when it names none itself")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (and its sidecar)")
    p.add_argument("--progress", default="auto", choices=("auto", "rich", "off"),
                   help="the progress bar (auto: on a terminal)")


class RichProgress(Progress):
    """A rich progress bar on stderr: input bytes done, documents/s, MB/s of text, tokens/s, ETA."""

    def __init__(self):
        self._p = None
        self._task = None

    def start(self, phase: str, total_bytes: int) -> None:
        import time

        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.stop()
        self._p = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                      TextColumn("{task.fields[rates]}"), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=False)
        self._task = self._p.add_task(phase, total=total_bytes or None, rates="")
        self._t0, self._docs, self._text, self._tokens = time.perf_counter(), 0, 0, 0
        self._p.start()

    def advance(self, consumed: int, documents: int, text_bytes: int, tokens: int) -> None:
        import time

        self._docs, self._text, self._tokens = self._docs + documents, self._text + text_bytes, self._tokens + tokens
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rates = f"{self._docs / dt:,.0f} docs/s  {self._text / dt / 1e6:.1f} MB/s"
        if self._tokens:
            rates += f"  {self._tokens / dt / 1e6:.2f}M tok/s"
        self._p.update(self._task, advance=consumed, rates=rates)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def _with_sigterm(fn):
    """Run fn with SIGTERM raising SystemExit(143), so a killed prepare removes its temporaries as
    Ctrl-C does (Python's default SIGTERM ends the process without unwinding)."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    try:
        before = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        return fn()
    try:
        return fn()
    finally:
        signal.signal(signal.SIGTERM, before)


def run(args) -> int:
    show = args.progress == "rich" or (args.progress == "auto" and sys.stderr.isatty())
    argv = [a for a in sys.argv[1:] if a != "--debug"]
    command = "dba " + shlex.join(argv) if argv and argv[0] == "prepare" else "dba prepare " + shlex.join(
        ([*args.sources] + ["--out", args.out]))
    opts = Options(sources=list(args.sources), out=args.out, tokenizer=args.tokenizer, fmt=args.format,
                   text_field=args.text_field, glob=args.glob, workers=args.workers, val_frac=args.val_frac,
                   corpus=args.corpus, dtype=args.dtype, eot=args.eot, overwrite=args.overwrite, command=command)
    side = _with_sigterm(lambda: prepare(opts, RichProgress() if show else None))
    for w in side["warnings"]:
        print(f"dba prepare: warning: {w}", file=sys.stderr, flush=True)
    secs = side["seconds"]
    mb = side["text_bytes"] / 1e6
    print(f"dba prepare: wrote {args.out}: {side['documents']:,} documents, {side['tokens']:,} tokens ({side['dtype']}, "
          f"vocab {side['vocab_size']:,}, end of text {side['eot']} = {side['eot_id']}) from {mb:,.1f} MB of text "
          f"in {secs:.1f} s ({mb / max(secs, 1e-9):.1f} MB/s)")
    if side.get("val"):
        v = side["val"]
        print(f"dba prepare: held out {v['documents']:,} documents ({v['tokens']:,} tokens, by {v['by']}) in "
              f"{v['file']}")
    from dba.prepared import sidecar_path

    print(f"dba prepare: sidecar {sidecar_path(args.out)}")
    return 0
