"""What a command reads from a checkpoint besides its weights, shared by `dba sample`, `dba eval`
and the self-opt calibration: the tokenizer it records, the run it belongs to, and that run's
data (its held-out split by default)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from dba.errors import UserError


class Unavailable:
    """A tokenizer the checkpoint records but this machine cannot load: why (one line)."""

    def __init__(self, label: str, why: str):
        self.label, self.why = label, why


def _beside(ckpt: str | None) -> tuple[str, ...]:
    """Where a checkpoint's tokenizer.json may also be: the run directory, or the export's."""
    if not ckpt:
        return ()
    p = os.path.abspath(ckpt)
    return (p if os.path.isdir(p) else os.path.dirname(p),)


def checkpoint_tokenizer(metadata: dict[str, Any] | None, ckpt: str | None, *, load: str | None = None):
    """The tokenizer a checkpoint records (its metadata's `tokenizer`), or None when it records
    none. A recorded tokenizer.json is also looked for beside the checkpoint. Lazy by default
    (token-id data needs no tokenizer files); with `load="dba sample"` it is loaded now, and one
    whose files cannot be had here becomes `Unavailable`, said in one line on stderr under that
    command's name (the output then falls back to token ids)."""
    raw = (metadata or {}).get("tokenizer")
    if not raw:
        return None
    from dba.data import tokenizer_from_dict, tokenizer_label

    try:
        record = json.loads(raw)
        tok = tokenizer_from_dict(record, lazy=True, search=_beside(ckpt))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the checkpoint's tokenizer record is unreadable: {e}", 1) from None
    if load and hasattr(tok, "load"):
        try:
            tok.load()
        except UserError as e:
            label = tokenizer_label(record)
            print(f"{load}: the run's tokenizer {label} is not available here ({e}); token ids in and out",
                  file=sys.stderr, flush=True)
            return Unavailable(label, str(e))
    return tok


def run_record(ckpt: str) -> dict[str, Any] | None:
    """The `meta` event of the run a checkpoint belongs to (a run directory, or an export inside one)."""
    from dba.runlog import read_events

    p = Path(ckpt)
    for d in (p, p.parent):
        log = d / "train.jsonl"
        if d.is_dir() and log.is_file():
            metas = read_events(log, "meta")
            if metas:
                return metas[-1]
    return None


def run_tokens(args: argparse.Namespace, cfg, tokenizer) -> tuple[Any, str]:
    """(tokens, where they came from): `args.data` (with `data_format`, `data_dtype`), else the
    data of the run `args.ckpt` belongs to; with `args.split == "val"` its held-out part: the
    held-out file of a `dba prepare` output, else the tail the run held out."""
    from dba import prepared
    from dba.data import load_tokens, split_train_val
    from train.args import saved_flags

    meta = run_record(args.ckpt)
    flags = saved_flags((meta or {}).get("flags") or {})
    if args.data is not None:
        path, fmt, dtype = args.data, args.data_format, args.data_dtype
    elif meta is not None:
        path, fmt, dtype = flags.get("data"), flags.get("data_format", "auto"), flags.get("data_dtype", "uint16")
    else:
        raise UserError(f"{args.ckpt!r} is not a run directory with a train.jsonl: give the data with --data")
    tokens, _, _ = load_tokens(path, data_format=fmt, data_dtype=dtype, tokenizer=tokenizer,
                               vocab_size=cfg.vocab_size)
    source = path or "default corpus (pydoc_data.topics)"
    if args.split == "val":
        held = prepared.held_out_tokens(path, prepared.read_sidecar(path)) if fmt in ("auto", "npy") else None
        if held is not None:  # a dba prepare output's own held-out split, which its run validated on
            tokens, source = held, f"{source}, held-out split {prepared.val_path(path)}"
        else:
            frac = float(flags.get("val_frac") or 0.1)
            tokens = split_train_val(tokens, frac)[1]
            source += f", held-out tail ({frac:g})"
    return tokens, source
