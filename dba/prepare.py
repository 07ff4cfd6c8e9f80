"""`dba prepare`: text sources -> one token file (.npy) with its sidecar, streamed, in parallel.

The main process reads the sources (dba/sources.py) into chunks of about 2 MiB of text, worker
processes tokenize them (dba/doc_encode.py), and the results are written in input order as they
come back, at most two chunks per worker in flight: memory stays bounded whatever the input size,
and the output is the same for any number of workers. `workers=1` tokenizes in this process.

The held-out split (`val_frac` > 0) is by document: document i (counting every record read,
skipped ones included) is held out when floor((i+1)·F) > floor(i·F), i.e. every 1/F-th document,
spread evenly over the sources. The python-stdlib corpus holds out by file instead (a hash of the
relative path, dba/stdlib_corpus.py). Held-out documents go to OUT.val.npy, and a bpe:N tokenizer
never sees them.

Everything is written under temporary names and renamed into place at the end (dba/npy_stream.py):
a failure or Ctrl-C leaves nothing behind, and an existing output is replaced only with
`overwrite`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

from dba import prepared
from dba.doc_encode import COUNTS, Encoder, end_of_text, item_text, token_dtype
from dba.errors import UserError
from dba.npy_stream import NpyStream, Staged
from dba.sources import SourceFile, Unreadable, file_size, list_files, read_pieces, source_hashes

CHUNK_BYTES = 2 << 20  # text per chunk handed to a worker
CHUNK_ITEMS = 8192  # ... or this many documents
CORPORA = ("python-stdlib",)


@dataclass
class Options:
    sources: list[str]
    out: str
    tokenizer: str = "byte"
    fmt: str = "auto"
    text_field: str = "text"
    glob: str | None = None
    workers: int | None = None  # None: the machine's cores; 1 for the byte tokenizer (see default_workers)
    val_frac: float | None = None  # None: none (the stdlib corpus: 0.02)
    corpus: str | None = None
    dtype: str = "auto"
    eot: str | None = None
    overwrite: bool = False
    command: str = ""
    corpus_root: str | None = None  # the stdlib corpus from another directory (tests: a small tree)


class Progress:
    """What `prepare` reports as it goes (the CLI draws it with rich); this one says nothing."""

    def start(self, phase: str, total_bytes: int) -> None: ...

    def advance(self, consumed: int, documents: int, text_bytes: int, tokens: int) -> None: ...

    def stop(self) -> None: ...


@dataclass
class _Tally:
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    first: dict = field(default_factory=dict)  # reason -> "path:line" of its first occurrence
    repaired_files: set = field(default_factory=set)
    unreadable: list = field(default_factory=list)  # (path, why)


def default_workers(tokenizer: str) -> int:
    """The cores, except for the byte tokenizer: its work (UTF-8 bytes as ids) is cheaper than
    handing a chunk to another process and back (measured on a 1.5 GB JSONL: 93 MB/s in one
    process, 55 MB/s with two workers; README "Data")."""
    return 1 if str(tokenizer).strip().lower() == "byte" else cores()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_out(opts: Options, targets: list[str]) -> None:
    out = opts.out
    if not out.lower().endswith(".npy"):
        raise UserError(f"--out {out!r}: the token file's name must end in .npy")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise UserError(f"--out {out!r}: directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise UserError(f"--out {out!r}: directory {d} is not writable", 1)
    if not opts.overwrite:
        for t in targets:
            if os.path.exists(t):
                raise UserError(f"{t} exists; pass --overwrite to replace it")


def _files(opts: Options, exclude: set[str]) -> tuple[list[SourceFile], list[str], dict | None]:
    """(files, the source names recorded, the corpus record)."""
    if opts.corpus is not None:
        if opts.corpus not in CORPORA:
            raise UserError(f"--corpus {opts.corpus!r}: choose one of {', '.join(CORPORA)}")
        if opts.sources:
            raise UserError("--corpus builds its own sources: give either SRC... or --corpus")
        from dba import stdlib_corpus

        root = opts.corpus_root or stdlib_corpus.stdlib_root()
        files = [SourceFile(p, "txt", file_size(p), 0, rel) for p, rel in stdlib_corpus.stdlib_files(root)]
        if not files:
            raise UserError(f"--corpus {opts.corpus}: no .py files under {root}", 1)
        return files, [root], {"name": opts.corpus, "python": stdlib_corpus.python_record(), "files": len(files)}
    if not opts.sources:
        raise UserError("give the sources to prepare (files or directories), or --corpus python-stdlib")
    files = [f for f in list_files(opts.sources, fmt=opts.fmt, glob=opts.glob)
             if os.path.abspath(f.path) not in exclude]
    return files, list(opts.sources), None


def _val_rule(opts: Options):
    """is_val(document index, file) for the split, and the split's record (None: no split)."""
    frac = opts.val_frac
    if frac is None and opts.corpus is not None:
        from dba.stdlib_corpus import DEFAULT_VAL_FRAC

        frac = DEFAULT_VAL_FRAC
    if frac is None or frac == 0:
        return (lambda i, f: False), None
    if not 0.0 < float(frac) < 1.0:
        raise UserError(f"--val-frac {frac}: choose a fraction in [0, 1)")
    frac = float(frac)
    if opts.corpus is not None:
        from dba.stdlib_corpus import held_out

        return (lambda i, f: held_out(f.rel, frac)), {"by": "file", "frac": frac}
    return (lambda i, f: int((i + 1) * frac) > int(i * frac)), {"by": "document", "frac": frac}


def _items(files, opts: Options, is_val, tally: _Tally, hashes=None):
    """(item, consumed bytes) over every document piece of every file (items as dba/doc_encode.py
    takes them: kind, payload, doc_end, line, val, file index), unreadable files counted."""
    doc = 0
    for fi, sf in enumerate(files):
        hasher = hashes[sf.source] if hashes is not None else None
        if hasher is not None:
            hasher.update(sf.rel.encode("utf-8") + b"\0")
        val = None
        try:
            for pieces, consumed in read_pieces(sf, text_field=opts.text_field, hasher=hasher):
                for kind, payload, doc_end, line in pieces:
                    if val is None:
                        val = bool(is_val(doc, sf))
                    yield (kind, payload, doc_end, line, val, fi), 0
                    if doc_end:
                        doc, val = doc + 1, None
                yield None, consumed
        except Unreadable as e:
            tally.unreadable.append((sf.path, str(e)))
            yield None, sf.size


def _chunks(items):
    """(chunk, consumed bytes) of about CHUNK_BYTES of text each, in order."""
    chunk, size, consumed = [], 0, 0
    for item, used in items:
        consumed += used
        if item is None:
            continue
        chunk.append(item)
        payload = item[1]
        size += len(payload) if payload is not None else 0
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_ITEMS:
            yield chunk, consumed
            chunk, size, consumed = [], 0, 0
    if chunk or consumed:
        yield chunk, consumed


def _encode_ordered(chunks, spec: dict, workers: int):
    """(result, consumed) per chunk, in order: in this process, or on a pool of `workers`
    processes with at most two chunks per worker in flight."""
    if workers <= 1:
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker is one core
        try:
            enc = Encoder(spec)
            for chunk, consumed in chunks:
                yield enc(chunk), consumed
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from dba.doc_encode import encode_in_worker, init_worker

    Encoder(spec)  # a tokenizer that cannot load fails here, once, not in every worker
    # spawn: a fresh interpreter per worker (a forked copy of a process whose tokenizer or JAX
    # already started threads can deadlock); an executor, not a Pool: a worker that dies (killed
    # for memory) breaks it with an error instead of being replaced while its chunk waits forever
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                               initargs=(spec,))
    try:
        window: deque = deque()
        for chunk, consumed in chunks:
            window.append((pool.submit(encode_in_worker, chunk), consumed))
            if len(window) >= 2 * workers:
                res, used = window.popleft()
                yield res.result(), used
        while window:
            res, used = window.popleft()
            yield res.result(), used
    except BrokenProcessPool as e:
        raise UserError(f"a tokenizing worker process died ({e}); try fewer --workers", 1) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the chunks being encoded finish (~1 s at most)


def _tokenizer(opts: Options, staged: Staged, files, is_val, progress: Progress, warnings: list):
    """(record, loaded tokenizer, spec extras): a named tokenizer, or a bpe:N trained now."""
    from dba.bpe import EOT, parse_bpe, train_bpe
    from dba.data import HFTokenizer, get_tokenizer, parse_tokenizer

    n = parse_bpe(opts.tokenizer)
    if n is None:
        if parse_tokenizer(opts.tokenizer)[0] == "word":
            raise UserError("--tokenizer word: dba has no word tokenizer; choose byte, bpe:N, tiktoken:gpt2 or a "
                            "tokenizer.json")
        tok = get_tokenizer(opts.tokenizer)
        return tok.to_dict(), tok, {}
    if opts.eot is not None:
        raise UserError(f"--eot: a bpe:N tokenizer's end of text is its own {EOT}")
    final = prepared.tokenizer_path(opts.out)
    tmp = staged.path(final)
    progress.start(f"training bpe:{n}", sum(f.size for f in files))

    def texts():
        for chunk, consumed in _chunks(_items(files, opts, is_val, _Tally())):
            batch = []
            for item in chunk:
                if not item[4]:  # held-out documents stay unseen
                    text = item_text(item, opts.text_field, dict.fromkeys(COUNTS, 0), {}, set())
                    if text:
                        batch.append(text)
            progress.advance(consumed, 0, sum(len(t) for t in batch), 0)
            yield from batch

    train_bpe(texts(), n, tmp)
    progress.stop()
    tok = HFTokenizer(tmp)
    if tok.vocab_size < n:
        warnings.append(f"bpe:{n} learned only {tok.vocab_size:,} tokens: the sources have too few distinct merges")
    record = {"name": "hf", "path": os.path.abspath(final), "sha256": tok.sha256, "vocab_size": tok.vocab_size}
    return record, tok, {"tokenizer_file": tmp, "eot": EOT}


def prepare(opts: Options, progress: Progress | None = None) -> dict:
    """Tokenize the sources into opts.out and its sidecar; returns the sidecar's content plus
    `warnings` (one line each) and `seconds`."""
    progress = progress or Progress()
    t0 = time.perf_counter()
    val_out = prepared.val_path(opts.out)
    targets = [opts.out, prepared.sidecar_path(opts.out)]
    is_val, split = _val_rule(opts)
    if split is not None:
        targets.append(val_out)
    if opts.tokenizer.lower().startswith("bpe:"):
        targets.append(prepared.tokenizer_path(opts.out))
    _check_out(opts, targets)
    workers = default_workers(opts.tokenizer) if opts.workers is None else int(opts.workers)
    if workers < 1:
        raise UserError(f"--workers {workers}: give at least 1")
    files, source_names, corpus = _files(opts, {os.path.abspath(t) for t in targets})
    warnings: list[str] = []
    with Staged() as staged:
        record, tok, extra = _tokenizer(opts, staged, files, is_val, progress, warnings)
        eot_id, eot_text = end_of_text(record, tok, extra.pop("eot", opts.eot))
        dtype = token_dtype(int(record["vocab_size"]), opts.dtype)
        spec = {"tokenizer": record, "eot": eot_id, "dtype": dtype, "text_field": opts.text_field, **extra}
        hashes = source_hashes(len(source_names))
        tally = _Tally()
        train = NpyStream(staged.path(opts.out), dtype)
        val = NpyStream(staged.path(val_out), dtype) if split is not None else None
        progress.start("tokenizing", sum(f.size for f in files))
        try:
            for (ids, val_ids, counts, first, bad), consumed in _encode_ordered(
                    _chunks(_items(files, opts, is_val, tally, hashes)), spec, workers):
                train.write(ids)
                if val is not None:
                    val.write(val_ids)
                for k, v in counts.items():
                    tally.counts[k] += v
                for reason, (fi, line) in first.items():
                    tally.first.setdefault(reason, f"{files[fi].path}:{line}" if line else files[fi].path)
                tally.repaired_files.update(files[fi].path for fi in bad)
                progress.advance(consumed, counts["documents"] + counts["val_documents"], counts["text_bytes"],
                                 len(ids) + len(val_ids))
        except BaseException:
            train.abort()
            if val is not None:
                val.abort()
            raise
        finally:
            progress.stop()
        train.close()
        if val is not None:
            val.close()
        c = tally.counts
        if c["documents"] + c["val_documents"] == 0:
            raise UserError(f"no documents to write: {_why_empty(files, tally)}", 1)
        if c["documents"] == 0:
            raise UserError(f"every document was held out (--val-frac {split['frac']}): nothing left to train on")
        warnings += _warnings(tally, eot_text, split, record)
        side = _sidecar(opts, record, eot_id, eot_text, dtype, train.length, tally, files, source_names, hashes,
                        corpus, split, val)
        if split is not None and c["val_documents"] == 0:
            side["val"] = None  # the empty held-out file is not written
            staged.drop(val_out)
        _write_json(staged.path(prepared.sidecar_path(opts.out)), side)
        if opts.overwrite:  # a stale sidecar must never describe the new file, even for a moment
            for stale in (prepared.sidecar_path(opts.out), val_out):
                if os.path.exists(stale):
                    os.unlink(stale)
        staged.commit()
    side["warnings"], side["seconds"] = warnings, time.perf_counter() - t0
    return side


def _why_empty(files, tally: _Tally) -> str:
    c = tally.counts
    parts = [f"{len(files)} file(s) read"]
    if tally.unreadable:
        parts.append(f"{len(tally.unreadable)} unreadable (first: {tally.unreadable[0][0]}: {tally.unreadable[0][1]})")
    for key, what in (("not_json", "JSONL lines not JSON"), ("no_field", "records without the text field"),
                      ("empty", "empty documents")):
        if c[key]:
            parts.append(f"{c[key]:,} {what} (first: {tally.first.get(key, '?')})")
    return "; ".join(parts)


def _warnings(tally: _Tally, eot_text: str, split, record) -> list[str]:
    c, out = tally.counts, []
    if tally.unreadable:
        path, why = tally.unreadable[0]
        out.append(f"skipped {len(tally.unreadable):,} unreadable file(s) (first: {path}: {why})")
    if c["not_json"]:
        out.append(f"skipped {c['not_json']:,} JSONL line(s) that are not JSON (first: {tally.first['not_json']})")
    if c["no_field"]:
        out.append(f"skipped {c['no_field']:,} record(s) without a text field (first: {tally.first['no_field']})")
    if c["repaired"]:
        out.append(f"replaced {c['repaired']:,} invalid UTF-8 sequence(s) with U+FFFD in {len(tally.repaired_files):,} "
                   f"file(s) (first: {sorted(tally.repaired_files)[0]})")
    if c["empty"]:
        out.append(f"skipped {c['empty']:,} empty document(s)")
    if c["eot_inside"]:
        out.append(f"the end-of-text token {eot_text} occurs {c['eot_inside']:,} time(s) inside documents (kept)")
    if split is not None and c["val_documents"] == 0:
        out.append(f"--val-frac {split['frac']}: no document was held out ({c['documents']:,} document(s), split by "
                   f"{split['by']}); no validation file written, dba train splits the tail instead")
    return out


def _sidecar(opts, record, eot_id, eot_text, dtype, tokens, tally, files, source_names, hashes, corpus, split,
             val) -> dict:
    c = tally.counts
    sources = []
    for i, name in enumerate(source_names):
        mine = [f for f in files if f.source == i]
        sources.append({"path": os.path.abspath(name), "files": len(mine), "bytes": sum(f.size for f in mine),
                        "sha256": hashes[i].hexdigest()})
    side = {"format": prepared.FORMAT, "version": prepared.VERSION, "tokens": int(tokens), "dtype": dtype,
            "documents": int(c["documents"]), "vocab_size": int(record["vocab_size"]), "tokenizer": record,
            "eot_id": int(eot_id), "eot": eot_text, "text_bytes": int(c["text_bytes"]), "sources": sources,
            "counts": {"unreadable_files": len(tally.unreadable), "repaired_sequences": c["repaired"],
                       "repaired_files": len(tally.repaired_files), "not_json": c["not_json"],
                       "no_field": c["no_field"], "empty": c["empty"], "eot_inside": c["eot_inside"]},
            "command": opts.command, "val": None}
    if corpus is not None:
        side["corpus"] = corpus
    if split is not None:
        side["val"] = {"file": os.path.basename(prepared.val_path(opts.out)), "tokens": int(val.length),
                       "documents": int(c["val_documents"]), **split}
        if split["by"] == "file":
            from dba.stdlib_corpus import held_out

            side["val"]["files"] = [f.rel for f in files if held_out(f.rel, split["frac"])]
    return side


def _write_json(path: str, obj) -> None:
    import json

    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")

