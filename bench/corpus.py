"""`dba bench corpus`: what `dba train`'s default recipe reaches on its built-in corpus and on this
Python's standard library (`dba prepare --corpus python-stdlib`), read as bytes and through a
trained byte-level BPE, in bits per byte of each run's held-out text, so the three compare.

    dba bench corpus --dir runs/corpus              # three default-recipe runs (minutes each)
    dba bench corpus --dir runs/corpus --bpe 8192 --json out.json

Each run is `dba train` with no model or schedule flag (the recipe: 600 steps, seq 128), only
`--data`. Bits per byte = the final evaluation's mean loss per token (nats) x held-out tokens /
held-out UTF-8 bytes / ln 2. The built-in corpus (pydoc's topics, read byte by byte) holds out its
last 10% (v29's split: bytes = tokens); the stdlib runs hold out the same files (the sidecar's
by-file split), whose bytes are counted from the files themselves. Reused when a run is complete.
A second table scores every run on both held-out texts (consecutive windows of 128 tokens, each
text read with the run's own tokenizer), the one yardstick the three share.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_main, int_at_least, machine, print_table, run_complete, run_dba, write_json
from dba.runlog import read_events

SEQ = 128  # the recipe's training context


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="runs/corpus", help="where the data and runs go (complete runs are reused)")
    p.add_argument("--bpe", type=int_at_least(257), default=2048,
                   help="the BPE's vocabulary (default 2048: the recipe's model stays near its byte size)")
    p.add_argument("--json", default=None, help="also write the results here")


def _held_out_bytes(data: Path) -> tuple[int, int]:
    """(held-out tokens, the UTF-8 bytes of the held-out files) of a prepared stdlib corpus."""
    side = json.loads(data.with_suffix(".json").read_text())
    root = Path(side["corpus"]["python"]["stdlib"])
    return int(side["val"]["tokens"]), sum((root / f).stat().st_size for f in side["val"]["files"])


def _windows_nats(model, ids: np.ndarray, ctx: int) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the tokens scored, over consecutive windows of `ctx`
    inputs (each token sees its window's earlier tokens: the trained context)."""
    n = (len(ids) - 1) // ctx
    total = 0.0
    for i in range(0, n, 16):
        rows = np.stack([ids[j * ctx:(j + 1) * ctx + 1] for j in range(i, min(n, i + 16))])
        logits = np.asarray(model(rows[:, :-1]), np.float64)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        total += float((lse - np.take_along_axis(logits, rows[:, 1:, None], -1)[..., 0]).sum())
    return total, n * ctx


def _cross(root: Path, bpe_data: Path, runs: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Bits per byte of every run on both held-out texts (the built-in corpus's tail and the
    stdlib's files), each read with the run's own tokenizer: one yardstick for all three."""
    import jax_model
    from tokenizers import Tokenizer

    from dba.data import default_corpus_text, split_train_val

    pydoc_ids = np.frombuffer(default_corpus_text().encode("utf-8"), np.uint8).astype(np.int64)
    pydoc_val = split_train_val(pydoc_ids, 0.1)[1]
    pydoc_text = bytes(pydoc_val.astype(np.uint8)).decode("utf-8", "replace")
    stdlib_tokens, stdlib_bytes = _held_out_bytes(root / "stdlib.npy")
    texts = {"byte": {"built-in corpus": (pydoc_val, len(pydoc_val)),
                      "stdlib files": (np.load(root / "stdlib.val.npy").astype(np.int64), stdlib_bytes)},
             "bpe": {"built-in corpus": (np.array(Tokenizer.from_file(str(bpe_data.with_suffix(".tokenizer.json")))
                                                  .encode(pydoc_text).ids, np.int64), len(pydoc_text.encode("utf-8"))),
                     "stdlib files": (np.load(bpe_data.with_suffix(".val.npy")).astype(np.int64), stdlib_bytes)}}
    out: dict[str, dict[str, float]] = {}
    for label, run_dir in runs.items():
        model = jax_model.load(str(run_dir))
        out[label] = {}
        for text, (ids, n_bytes) in texts["bpe" if "bpe" in label else "byte"].items():
            total, scored = _windows_nats(model, ids, SEQ)
            out[label][text] = total / scored * (len(ids) / n_bytes) / math.log(2)
    return out


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from dba.errors import UserError

        raise UserError(f"--dir {args.dir!r}: cannot make the working directory ({e.strerror})", 2) from None
    byte_data, bpe_data = root / "stdlib.npy", root / f"stdlib_bpe{args.bpe}.npy"
    if not byte_data.is_file():
        print("preparing the stdlib corpus (bytes) ...", file=sys.stderr, flush=True)
        run_dba("prepare", "--corpus", "python-stdlib", "--out", byte_data)
    if not bpe_data.is_file():
        print(f"preparing the stdlib corpus (bpe:{args.bpe}) ...", file=sys.stderr, flush=True)
        run_dba("prepare", "--corpus", "python-stdlib", "--tokenizer", f"bpe:{args.bpe}", "--out", bpe_data)

    rows: list[dict[str, Any]] = []
    runs: dict[str, Path] = {}
    for label, data in (("built-in corpus (pydoc topics), bytes", None), ("python-stdlib, bytes", byte_data),
                        (f"python-stdlib, bpe:{args.bpe}", bpe_data)):
        run_dir = root / ("default" if data is None else data.stem)
        runs[label] = run_dir
        if not run_complete(run_dir):
            print(f"training {run_dir.name} (the default recipe) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            run_dba("train", *([] if data is None else ["--data", data]), "--out-dir", run_dir, "--overwrite",
                 "--live", "off")
            (run_dir / "bench_wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        events = read_events(run_dir / "train.jsonl")
        meta = next(e for e in events if e.get("type") == "meta")
        last_eval = [e for e in events if e.get("type") == "eval"][-1]
        params = int(meta["n_params"])
        if data is None:
            val_tokens = int(meta["data"]["val_tokens"])
            val_bytes = val_tokens
        else:
            val_tokens, val_bytes = _held_out_bytes(data)
        loss = float(last_eval["val_loss"])
        bpb = loss * val_tokens / val_bytes / math.log(2)
        wall = (run_dir / "bench_wall_s.txt")
        rows.append({"data": label, "params": params, "val_tokens": val_tokens, "val_bytes": val_bytes,
                     "val_loss": loss, "bits_per_byte": bpb, "steps": int(last_eval["step"]),
                     "wall_s": float(wall.read_text()) if wall.is_file() else None})
    print_table("dba train's default recipe (600 steps, seq 128), bits per byte of each run's held-out text",
                ["data", "params", "held-out tokens", "held-out bytes", "val loss (nats/token)",
                 "bits per byte", "wall s"],
                [[r["data"], f"{r['params']:,}", f"{r['val_tokens']:,}",
                  f"{r['val_bytes']:,}", f"{r['val_loss']:.4f}", f"{r['bits_per_byte']:.3f}",
                  "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"] for r in rows])
    cross = _cross(root, bpe_data, runs)
    texts = list(next(iter(cross.values())))
    print_table(f"the same runs on both held-out texts (bits per byte; windows of {SEQ} tokens, each run's tokenizer)",
                ["run", *texts], [[label, *(f"{v[t]:.3f}" for t in texts)] for label, v in cross.items()])
    if args.json:
        write_json(args.json, {"rows": rows, "cross": cross, "machine": machine()})
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.corpus", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
