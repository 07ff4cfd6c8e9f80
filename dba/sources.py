"""What `dba prepare SRC...` reads: the files its arguments mean and their documents, streamed.

- A file is read in its format (`--format`, or by name: .jsonl/.ndjson -> jsonl, .parquet/.pq ->
  parquet, .arrow -> arrow, anything else -> txt; a trailing .gz is decompressed on the fly).
- A directory is walked recursively in sorted order (hidden names skipped), keeping the files
  whose name (or, for a pattern with a '/', whose relative path) matches `--glob`; every file
  without one. A directory written by `datasets.save_to_disk` (a state.json listing its arrow
  files) is that dataset: its arrow files in their order.
- Documents: a txt file is one document; a JSONL line is one (its `--text-field`); a row of a
  Parquet or Arrow table is one (its `--text-field` column, read a record batch at a time).

Nothing holds a whole input in memory: a txt file is cut into pieces of about 1 MiB, after a
newline (a newline byte never sits inside a UTF-8 character, so each piece decodes alone), and
only pieces travel on. Pieces are tuples (kind, payload, doc_end, line): kind TEXT (a str), RAW
(UTF-8 bytes, decoded by the tokenizing worker with repair) or JSONL (one line's bytes, parsed
by the worker), `doc_end` True on a document's last piece, `line` the JSONL line number.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
from dataclasses import dataclass

from dba.errors import UserError

FORMATS = ("auto", "txt", "jsonl", "parquet", "arrow")
TEXT, RAW, JSONL = 0, 1, 2  # piece kinds
PIECE_BYTES = 1 << 20  # a txt file is read this much at a time, cut after the last newline
MAX_PIECE_BYTES = 4 << 20  # a run without a newline this long is cut at a character boundary
ROWS_PER_BATCH = 2048  # Parquet rows per record batch


@dataclass(frozen=True)
class SourceFile:
    path: str
    fmt: str
    size: int
    source: int  # index of the SRC argument it came from
    rel: str  # its path relative to that argument (the argument itself for a file)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def file_format(path: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    name = path.lower().removesuffix(".gz")
    ext = os.path.splitext(name)[1]
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
            ".arrow": "arrow"}.get(ext, "txt")


def saved_dataset_files(d: str) -> list[str] | None:
    """The arrow files of a directory `datasets.save_to_disk` wrote (state.json's `_data_files`,
    in order), or None when `d` is not one."""
    if os.path.isfile(os.path.join(d, "dataset_dict.json")):
        try:
            with open(os.path.join(d, "dataset_dict.json"), encoding="utf-8") as f:
                splits = ", ".join(json.load(f).get("splits") or [])
        except (OSError, ValueError, AttributeError):
            splits = "?"
        raise UserError(f"{d} is a DatasetDict saved by datasets (splits: {splits}): give one split's directory, "
                        f"e.g. {os.path.join(d, 'train')}")
    state = os.path.join(d, "state.json")
    if not os.path.isfile(state):
        return None
    try:
        with open(state, encoding="utf-8") as f:
            files = [x["filename"] for x in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [os.path.join(d, name) for name in files]


def _walk(d: str, pattern: str | None) -> list[tuple[str, str]]:
    """(path, relative path) of the files under d matching `pattern`, sorted, hidden names skipped."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, d).replace(os.sep, "/")
            if pattern is None or fnmatch.fnmatch(rel if "/" in pattern else name, pattern):
                out.append((path, rel))
    return sorted(out, key=lambda x: x[1])


def list_files(sources: list[str], *, fmt: str = "auto", glob: str | None = None) -> list[SourceFile]:
    """Every file the SRC arguments mean, in order; a missing SRC or one that yields no file is
    a one-line error (a directory entry that cannot be read is the reader's business)."""
    out = []
    for i, src in enumerate(sources):
        if not os.path.exists(src):
            raise UserError(f"source not found: {src}")
        if os.path.isdir(src):
            saved = saved_dataset_files(src)
            if saved is not None:
                found = [(p, os.path.basename(p)) for p in saved]
                kind = "arrow"
            else:
                found, kind = _walk(src, glob), None
            if not found:
                raise UserError(f"{src}: no files" + (f" match --glob {glob!r}" if glob else ""))
            for path, rel in found:
                out.append(SourceFile(path, kind or file_format(path, fmt), file_size(path), i, rel))
        else:
            if not os.access(src, os.R_OK):
                raise UserError(f"{src}: not readable", 1)
            out.append(SourceFile(src, file_format(src, fmt), file_size(src), i, os.path.basename(src)))
    return out


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # a dangling link: reported as unreadable when it is read


class Unreadable(Exception):
    """A file that cannot be opened or is not in its format: skipped and counted by the caller."""


def _open(path: str):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise Unreadable(e.strerror or one_line(e)) from None
    if path.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    return f, f


def _utf8_cut(buf: bytes, end: int) -> int:
    """The largest cut <= end that does not split a UTF-8 character (back over continuation bytes)."""
    cut = end
    while cut > end - 4 and cut > 0 and (buf[cut - 1] & 0xC0) == 0x80:
        cut -= 1
    if cut > 0 and buf[cut - 1] >= 0xC0:  # a lead byte whose continuation was cut off
        cut -= 1
    return cut if cut > 0 else end


def read_pieces(sf: SourceFile, *, text_field: str = "text", hasher=None):
    """Yield (pieces, consumed input bytes) for one file: pieces as described in the module doc.
    Raises Unreadable when the file cannot be opened or is not in its format; `hasher` is
    updated with the file's bytes."""
    if sf.fmt in ("txt", "jsonl"):
        yield from _read_lines_or_text(sf, text_field, hasher)
    else:
        yield from _read_table(sf, text_field, hasher)


def _read_lines_or_text(sf: SourceFile, text_field: str, hasher):
    f, raw = _open(sf.path)
    try:
        last = 0

        def consumed() -> int:
            nonlocal last
            pos = raw.tell()
            n, last = pos - last, pos
            return n

        if sf.fmt == "jsonl":
            yield from _jsonl_pieces(f, consumed, hasher, sf.path)
        else:
            yield from _text_pieces(f, consumed, hasher, sf.path)
    finally:
        raw.close()


def _read(f, n: int, hasher, path: str) -> bytes:
    try:
        block = f.read(n)
    except (OSError, EOFError) as e:  # also a damaged .gz
        raise UserError(f"{path}: read failed ({one_line(e)})", 1) from None
    if hasher is not None and block:
        hasher.update(block)
    return block


def _text_pieces(f, consumed, hasher, path: str):
    pending, carry = None, b""
    while True:
        block = _read(f, PIECE_BYTES, hasher, path)
        if not block:
            break
        buf = carry + block
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            if len(buf) < MAX_PIECE_BYTES:
                carry = buf
                continue
            cut = _utf8_cut(buf, len(buf))
        carry = buf[cut:]
        # one piece of lookahead: a document's last piece is never empty unless the document is
        if pending is not None:
            yield [(RAW, pending, False, 0)], consumed()
        pending = buf[:cut]
    last = carry if pending is None else pending + carry
    yield [(RAW, last, True, 0)], consumed()


def _jsonl_pieces(f, consumed, hasher, path: str):
    batch, size, line = [], 0, 0
    carry = b""
    while True:
        block = _read(f, PIECE_BYTES, hasher, path)
        lines = (carry + block).split(b"\n")
        carry = lines.pop() if block else b""
        for text in lines:
            line += 1
            if text.strip():
                batch.append((JSONL, text, True, line))
                size += len(text)
        if batch and (size >= PIECE_BYTES or not block):
            yield batch, consumed()
            batch, size = [], 0
        if not block:
            break
    yield [], consumed()


def _hash_file(path: str, hasher) -> None:
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                hasher.update(block)
    except OSError as e:
        raise Unreadable(e.strerror or one_line(e)) from None


def _read_table(sf: SourceFile, text_field: str, hasher):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{sf.path}: reading {sf.fmt} needs pyarrow: pip install pyarrow", 1) from None
    if hasher is not None:
        _hash_file(sf.path, hasher)  # pyarrow reads the file itself: hash it in a pass of its own
    source = None
    try:
        if sf.fmt == "parquet":
            pf = pq.ParquetFile(sf.path)
            schema, rows = pf.schema_arrow, max(pf.metadata.num_rows, 1)
        else:
            source = pa.OSFile(sf.path)
            file_format = source.read(6) == b"ARROW1"  # the IPC file format; datasets writes the stream one
            source.seek(0)
            reader = pa.ipc.open_file(source) if file_format else pa.ipc.open_stream(source)
            schema = reader.schema
    except (OSError, pa.ArrowException) as e:
        if source is not None:
            source.close()
        raise Unreadable(one_line(e)) from None
    try:
        if text_field not in schema.names:
            raise UserError(f"{sf.path}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                            f"pass --text-field", 2)
        kind = schema.field(text_field).type
        binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        if not (binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{sf.path}: column {text_field!r} is {kind}, not text", 2)
        if sf.fmt == "parquet":
            batches = pf.iter_batches(batch_size=ROWS_PER_BATCH, columns=[text_field])
        elif file_format:
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        piece_kind, done, reported = (RAW if binary else TEXT), 0, 0
        try:
            for batch in batches:
                values = batch.column(batch.schema.get_field_index(text_field)).to_pylist()
                done += len(values)
                # progress in file bytes: rows read as a share of the file, or the arrow file's position
                at = min(sf.size * done // rows if sf.fmt == "parquet" else source.tell(), sf.size)
                yield [(piece_kind, v, True, 0) for v in values], at - reported  # v None: a missing value
                reported = at
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{sf.path}: read failed ({one_line(e)})", 1) from None
        yield [], sf.size - reported
    finally:
        if source is not None:
            source.close()


def source_hashes(n: int):
    """One sha256 per SRC argument, over its files' relative paths and bytes in reading order."""
    return [hashlib.sha256() for _ in range(n)]
