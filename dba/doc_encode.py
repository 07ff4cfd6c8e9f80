"""Documents -> token ids, the work `dba prepare` spreads over processes: decode, parse, tokenize,
separate documents with the tokenizer's end-of-text id.

A chunk is a list of items (kind, payload, doc_end, line, val, file) (see dba/sources.py for the
first four): `val` routes the piece to the held-out stream, `file` indexes the source file (for
the warnings). The result is (train ids, val ids, counts, first); the same chunk gives the same
result in any process, so the output does not depend on how many workers there are.

Policies (what is counted, never silent):
- bytes that are not UTF-8 are replaced with U+FFFD (the piece is kept): `repaired` counts the
  invalid sequences, `repaired_files` the files holding them;
- a JSONL line that is not JSON, or whose `--text-field` is missing, null or not a string, is
  skipped (`not_json`, `no_field`; `first` keeps the first (file, line) of each), as is a Parquet
  or Arrow row whose text is null (`no_field`);
- an empty document is skipped (`empty`): no end-of-text for it;
- the end-of-text id inside a document's own ids (the byte tokenizer's ETX byte, a literal special
  token) is kept and counted (`eot_inside`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from dba.errors import UserError
from dba.sources import JSONL, RAW

# The byte tokenizer has no spare id (vocab 256), so documents end with ASCII ETX, 0x03 ("end of
# text"), a control byte that text does not use; decode shows it as '\x03'.
BYTE_EOT = 0x03
# Special tokens taken as a tokenizer.json's end of text, in this order, when no
# tokenizer_config.json beside it names its eos_token.
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|end|>", "[EOS]")
COUNTS = ("documents", "val_documents", "text_bytes", "repaired", "not_json", "no_field", "empty", "eot_inside")


def token_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """uint16 when every id fits (vocab <= 65,536), else uint32; `dtype` forces one."""
    need = "uint16" if vocab_size <= 1 << 16 else "uint32"
    if dtype == "auto":
        return need
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"--dtype {dtype!r}: choose auto, uint16 or uint32")
    if dtype == "uint16" and need == "uint32":
        raise UserError(f"--dtype uint16: the vocabulary has {vocab_size:,} ids, more than uint16's 65,536; "
                        f"use uint32 (or auto)")
    return dtype


def _special_tokens(path: str) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return {t["content"]: int(t["id"]) for t in d.get("added_tokens") or [] if t.get("special")}


def _config_eos(path: str) -> str | None:
    """eos_token of a tokenizer_config.json beside the tokenizer.json (transformers' layout)."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    try:
        with open(cfg, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


def end_of_text(record: dict, tok, eot: str | None = None) -> tuple[int, str]:
    """(id, token text) that ends each document. byte: ETX (0x03); tiktoken: <|endoftext|>; a
    tokenizer.json: `eot` when given, else the tokenizer_config.json's eos_token, else the first
    of EOT_NAMES among its special tokens."""
    name = record["name"]
    if name == "byte":
        if eot is not None:
            raise UserError("--eot: the byte tokenizer's end of text is fixed (byte 0x03)")
        return BYTE_EOT, "\\x03"
    if name == "tiktoken":
        if eot is not None and eot != "<|endoftext|>":
            raise UserError(f"--eot {eot!r}: tiktoken's end of text is <|endoftext|>")
        return int(tok.load()._enc.eot_token if hasattr(tok, "load") else tok._enc.eot_token), "<|endoftext|>"
    path = tok.path  # the file loaded (a bpe:N being written is still under its temporary name)
    special = _special_tokens(path)
    if eot is not None:
        vocab_id = tok._tok.token_to_id(eot) if hasattr(tok, "_tok") else None
        if vocab_id is None:
            raise UserError(f"--eot {eot!r}: not a token of {path}")
        return int(vocab_id), eot
    for candidate in [_config_eos(path), *EOT_NAMES]:
        if candidate in special:
            return special[candidate], candidate
    raise UserError(f"{path} has no end-of-text token (no eos_token in a tokenizer_config.json beside it, none of "
                    f"{', '.join(EOT_NAMES)} among its special tokens): name one with --eot TOKEN")


def _decode(raw: bytes, counts: dict, bad_files: set, file: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        counts["repaired"] += text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
        bad_files.add(file)
        return text


def item_text(item, field: str, counts: dict, first: dict, bad_files: set) -> str | None:
    """The text of one chunk item, or None (counted) for a JSONL line or a table row without one."""
    kind, payload, _, line, _, file = item
    if payload is None:  # a null table value
        counts["no_field"] += 1
        first.setdefault("no_field", (file, line))
        return None
    if kind == RAW:
        return _decode(payload, counts, bad_files, file)
    if kind != JSONL:
        return payload
    text = _decode(payload, counts, bad_files, file)
    try:
        obj = json.loads(text)
    except ValueError:
        counts["not_json"] += 1
        first.setdefault("not_json", (file, line))
        return None
    value = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        counts["no_field"] += 1
        first.setdefault("no_field", (file, line))
        return None
    return value


class Encoder:
    """Built once per process from a picklable spec: {"tokenizer": record, "eot": id, "dtype",
    "text_field"}; called on chunks."""

    def __init__(self, spec: dict):
        self.spec, self.eot, self.field = spec, int(spec["eot"]), spec["text_field"]
        self.dtype = np.dtype(spec["dtype"])
        rec = spec["tokenizer"]
        self._batch = None
        if rec["name"] == "hf":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(spec.get("tokenizer_file") or rec["path"])
            tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text
            fast = getattr(tok, "encode_batch_fast", tok.encode_batch)
            self._batch = lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]
        elif rec["name"] == "tiktoken":
            from dba.data import TiktokenTokenizer

            enc = TiktokenTokenizer(rec.get("encoding", "gpt2"))._enc
            self._batch = lambda texts: [enc.encode_ordinary(t) for t in texts]

    def __call__(self, chunk):
        counts = dict.fromkeys(COUNTS, 0)
        first: dict = {}
        bad_files: set = set()
        texts, kept = [], []
        for item in chunk:
            text = item_text(item, self.field, counts, first, bad_files)
            if text is None:
                continue
            if not text and item[2]:  # a document with no text (its only piece is empty)
                counts["empty"] += 1
                continue
            texts.append(text)
            kept.append(item)
        if self._batch is None:  # the byte tokenizer: the UTF-8 bytes are the ids
            ids = [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]
            counts["text_bytes"] = sum(len(i) for i in ids)
        else:
            ids = self._batch(texts) if texts else []
            counts["text_bytes"] = sum(len(t.encode("utf-8")) for t in texts)
        parts: tuple[list, list] = ([], [])
        eot = np.array([self.eot], self.dtype)
        for item, piece in zip(kept, ids):
            piece = np.asarray(piece, dtype=self.dtype)
            counts["eot_inside"] += int(np.count_nonzero(piece == self.eot))
            out = parts[1 if item[4] else 0]
            out.append(piece)
            if item[2]:
                out.append(eot)
                counts["val_documents" if item[4] else "documents"] += 1
        arrays = tuple(np.concatenate(p) if p else np.zeros(0, self.dtype) for p in parts)
        return arrays[0], arrays[1], counts, first, sorted(bad_files)


_ENCODER: Encoder | BaseException | None = None


def init_worker(spec: dict) -> None:
    """Pool initializer: one tokenizer per process, single-threaded (the processes are the
    parallelism), Ctrl-C left to the parent, which stops the pool and removes what it wrote. A
    failure is kept and raised by the first chunk (a pool restarts a worker whose initializer
    raises, forever)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _ENCODER
    try:
        _ENCODER = Encoder(spec)
    except BaseException as e:  # noqa: BLE001 - handed to the parent with the first chunk
        _ENCODER = e


def encode_in_worker(chunk):
    if isinstance(_ENCODER, BaseException):
        raise _ENCODER
    return _ENCODER(chunk)
