"""The sidecar `dba prepare` writes beside a token file, and what readers of the file take from it.

`corpus.npy` is described by `corpus.json` (the .npy's name with .json instead): its tokenizer
record, vocabulary size, dtype, end-of-text id, documents and tokens, the sources with their
sizes and sha256, the command line, and the held-out split, `corpus.val.npy`, when one was made.
A `bpe:N` tokenizer is `corpus.tokenizer.json` (named after the data, so two prepared files
can share a directory). A JSON file beside an .npy is a sidecar only when its "format" says so.

`dba train --data corpus.npy` therefore needs no --vocab-size or --tokenizer: the sidecar's are
used and recorded in the run (so `dba sample --prompt` speaks text); an explicit flag that says
otherwise is a one-line error. Its validation split is the sidecar's held-out file when there is
one (train trains on all of corpus.npy), else the tail of the stream as before.
"""

from __future__ import annotations

import json
import os

import numpy as np

from dba.errors import UserError

FORMAT, VERSION = "dba-prepared", 1


def _stem(npy_path: str) -> str:
    path = os.fspath(npy_path)
    return path[:-4] if path.lower().endswith(".npy") else path


def sidecar_path(npy_path: str) -> str:
    return _stem(npy_path) + ".json"


def val_path(npy_path: str) -> str:
    return _stem(npy_path) + ".val.npy"


def tokenizer_path(npy_path: str) -> str:
    return _stem(npy_path) + ".tokenizer.json"


def read_sidecar(npy_path: str | None) -> dict | None:
    """The sidecar of a token file, or None when it has none (no JSON beside it, or a JSON that
    is not one of ours). A sidecar that cannot be read is a one-line error."""
    if npy_path is None or not os.fspath(npy_path).lower().endswith(".npy"):
        return None
    path = sidecar_path(npy_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError) as e:
        head = ""
        try:
            with open(path, "rb") as f:
                head = f.read(200).decode("utf-8", "replace")
        except OSError:
            pass
        if FORMAT in head:
            raise UserError(f"{path}: the sidecar of {npy_path} cannot be read ({type(e).__name__})", 1) from None
        return None
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        return None
    if side.get("version") != VERSION:
        raise UserError(f"{path}: sidecar version {side.get('version')!r} is not one this dba reads ({VERSION})", 1)
    for key in ("tokens", "vocab_size", "tokenizer"):
        if key not in side:
            raise UserError(f"{path}: the sidecar has no {key!r}", 1)
    return side


def tokenizer_record(npy_path: str, side: dict) -> dict:
    """The sidecar's tokenizer record; a tokenizer.json recorded at a path that no longer exists
    is looked for beside the sidecar (a prepared directory that was moved)."""
    rec = dict(side["tokenizer"])
    if rec.get("name") == "hf" and not os.path.isfile(str(rec.get("path"))):
        here = os.path.join(os.path.dirname(os.path.abspath(npy_path)), os.path.basename(str(rec.get("path"))))
        if os.path.isfile(here):
            rec["path"] = here  # its sha256 is checked when it is loaded
    return rec


def check_tokens(npy_path: str, side: dict, tokens: np.ndarray) -> None:
    if len(tokens) != int(side["tokens"]):
        raise UserError(f"{npy_path} holds {len(tokens):,} tokens but its sidecar {sidecar_path(npy_path)} describes "
                        f"{int(side['tokens']):,}: they do not belong together (run dba prepare again)", 1)


def check_vocab(npy_path: str, side: dict, vocab_size: int | None) -> None:
    """An explicit --vocab-size that disagrees with the sidecar: a one-line error (an explicit
    --tokenizer is checked where it is read, dba.data.load_tokens)."""
    if vocab_size is not None and int(vocab_size) != int(side["vocab_size"]):
        raise UserError(f"--vocab-size {vocab_size}: {npy_path} was prepared with a vocabulary of "
                        f"{int(side['vocab_size'])} (its sidecar {sidecar_path(npy_path)}); drop --vocab-size")


def held_out_tokens(npy_path: str, side: dict | None) -> np.ndarray | None:
    """The sidecar's validation tokens (memory-mapped), or None when it made no split."""
    val = (side or {}).get("val")
    if not val:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(npy_path)), val["file"])
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: the held-out split its sidecar names cannot be read ({type(e).__name__})", 1) \
            from None
    if len(tokens) != int(val["tokens"]):
        raise UserError(f"{path} holds {len(tokens):,} tokens but the sidecar {sidecar_path(npy_path)} describes "
                        f"{int(val['tokens']):,}: run dba prepare again", 1)
    return tokens
