"""Token data: tokenizers, token files, train/val split, batch sampling.

numpy only (no jax, no torch): both the JAX trainer and the PyTorch reference read data here.
Binary token files are memory-mapped so a 100M-token corpus costs no RAM until sampled.

Data formats (`--data-format`, v29's meanings where v29 had the name):

- `npy`: a numpy array of integer ids (memory-mapped); `bin`: raw ids of `--data-dtype`;
- `pt`: a `torch.save`d integer tensor (read without torch, dba/torchfile.py);
- `text`: v29's text format, whitespace-separated integer token ids;
- `utf8`: text to tokenize (`--tokenizer`: byte by default, tiktoken:gpt2, a tokenizer.json);
- `auto`: by extension (.npy, .bin, .pt/.pth); a .txt/.text file is sniffed: only digits and
  whitespace -> `text` (ids), anything else -> `utf8` (`describe_data` says which was read).

A `.npy` that `dba prepare` wrote has a sidecar (dba/prepared.py): its tokenizer and vocabulary
are taken from there (an explicit `--tokenizer` must agree), and its held-out file is the
validation split (`train_val`).

Tokenizers (`--tokenizer`): `byte`, `tiktoken:gpt2` (aliases `tiktoken`, `gpt2`), a path to a
Hugging Face `tokenizer.json`, or `word` (v29's default value: accepted with token-id data, where
it has no effect; dba has no word tokenizer for text). With token-id data a named tokenizer is
not needed to train: only its record is kept (`tokenizer_record`), so a run on GPT-2 ids trained
offline still records tiktoken:gpt2 and `dba sample --prompt` can use it where its files exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import warnings

import numpy as np

from dba import prepared
from dba.errors import UserError

# Token dtypes we accept on disk. Unsigned 16-bit is v29's format (GPT-2 ids fit in it).
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
DATA_FORMATS = ("auto", "npy", "bin", "pt", "text", "utf8")
ID_FORMATS = ("npy", "bin", "pt", "text")  # files of token ids (no tokenizer needed to read them)
# Tokenizer names; a path to a Hugging Face tokenizer.json is accepted too.
TOKENIZERS = ("byte", "tiktoken:gpt2", "tiktoken", "gpt2", "word")
GPT2_VOCAB = 50257

_NPY_MAGIC = b"\x93NUMPY"


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids: vocab 256, needs no files, never fails offline."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # Sampled byte sequences can split a multi-byte character; show U+FFFD, don't raise.
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size}


# tiktoken fetches these two files on first use and caches them under its cache dir.
_GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
_GPT2_HOST = "openaipublic.blob.core.windows.net"


def _tiktoken_cache_has(urls) -> bool:
    """True when tiktoken's on-disk cache already holds every file (same lookup rule as tiktoken)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return False
    return all(
        os.path.exists(os.path.join(cache_dir, hashlib.sha1(u.encode()).hexdigest())) for u in urls
    )


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    # tiktoken's download has no timeout; probe first so an offline machine fails in seconds.
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


class TiktokenTokenizer:
    """GPT-2 BPE through tiktoken (V = 50257, the seed run's ids)."""

    name = "tiktoken"

    def __init__(self, encoding: str = "gpt2"):
        if encoding != "gpt2":
            raise UserError(f"tiktoken encoding {encoding!r} is not supported (only 'gpt2')")
        try:
            import tiktoken
        except ImportError:
            raise UserError(
                "tokenizer 'tiktoken' needs the tiktoken package: pip install tiktoken "
                "(or use --tokenizer byte)"
            ) from None
        offline_msg = (
            "tokenizer 'tiktoken': the GPT-2 BPE files are not in tiktoken's cache and cannot be "
            "downloaded (no internet?); run once with internet access, or set TIKTOKEN_CACHE_DIR to "
            "a directory holding them, or use --tokenizer byte"
        )
        if not _tiktoken_cache_has(_GPT2_URLS) and not _host_reachable(_GPT2_HOST):
            raise UserError(offline_msg, code=1)
        try:
            self._enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # network errors surface as requests/urllib exceptions
            raise UserError(f"{offline_msg} ({type(e).__name__})", code=1) from None
        self.encoding = encoding
        self.vocab_size = int(self._enc.n_vocab)

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a literal "<|endoftext|>" in a corpus is text, not a reason to raise.
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def to_dict(self) -> dict:
        return {"name": self.name, "encoding": self.encoding, "vocab_size": self.vocab_size}


WORD_REFUSED = ("--tokenizer word: dba has no word tokenizer for text; tokenize it with byte, tiktoken:gpt2 or a "
                 "tokenizer.json (word, v29's default, is accepted only with token-id data, where it has no effect)")


def parse_tokenizer(spec) -> tuple[str, str | None]:
    """A `--tokenizer` value -> (kind, argument): ("byte", None), ("tiktoken", "gpt2"),
    ("word", None) or ("hf", path of a tokenizer.json; a directory holding one is accepted)."""
    text = str(spec).strip()
    key = text.lower()
    if key in ("byte", "word"):
        return key, None
    if key in ("tiktoken", "gpt2", "tiktoken:gpt2"):
        return "tiktoken", "gpt2"
    if key.startswith("tiktoken:"):
        raise UserError(f"--tokenizer {text!r}: only tiktoken's gpt2 encoding is supported (tiktoken:gpt2)")
    if key.endswith(".json") or "/" in text or os.sep in text or os.path.exists(text):
        if os.path.isdir(text) and os.path.isfile(os.path.join(text, "tokenizer.json")):
            text = os.path.join(text, "tokenizer.json")
        if not os.path.isfile(text):
            raise UserError(f"--tokenizer {text!r}: no such tokenizer.json file")
        return "hf", text
    raise UserError(f"unknown tokenizer {text!r}; choose byte, tiktoken:gpt2 (alias gpt2, tiktoken), the path of a "
                    f"Hugging Face tokenizer.json, or word (token-id data only)")


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (the tokenizer.json records)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hf_vocab_size(path: str) -> int:
    """max id + 1 over a tokenizer.json's model vocabulary and added tokens (read as JSON, so a
    run on token ids can record the tokenizer without the tokenizers package)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"tokenizer {path}: not a readable tokenizer.json ({_one_line(e)})", 1) from None
    vocab = (d.get("model") or {}).get("vocab") if isinstance(d, dict) else None
    ids: list[int] = []
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: {piece: id}
        ids = [v for v in vocab.values() if isinstance(v, int)]
    elif isinstance(vocab, list) and vocab:  # Unigram: [[piece, score], ...], the id is the index
        ids = [len(vocab) - 1]
    if isinstance(d, dict):
        ids += [t["id"] for t in d.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    if not ids:
        raise UserError(f"tokenizer {path}: not a Hugging Face tokenizer.json (it has no model vocabulary)")
    return max(ids) + 1


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` package (optional dependency)."""

    name = "hf"

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"tokenizer {path}: reading a tokenizer.json needs the tokenizers package: "
                            f"pip install tokenizers", 1) from None
        self.vocab_size = _hf_vocab_size(path)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise UserError(f"tokenizer {path}: not a readable tokenizer.json ({_one_line(e)})", 1) from None
        self.path, self.sha256 = os.path.abspath(path), file_sha256(path)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size}


def tokenizer_label(record: dict | None) -> str:
    """How a tokenizer record is written on the command line: byte, tiktoken:gpt2, a path."""
    if not record:
        return "none"
    if record.get("name") == "tiktoken":
        return f"tiktoken:{record.get('encoding', 'gpt2')}"
    if record.get("name") == "hf":
        return str(record.get("path"))
    return str(record.get("name"))


def tokenizer_record(spec) -> dict | None:
    """The record (`to_dict()`) of the tokenizer a `--tokenizer` value names, without loading it:
    no tiktoken files or tokenizers package are needed. None for `word` (no tokenizer)."""
    kind, arg = parse_tokenizer(spec)
    if kind == "word":
        return None
    if kind == "byte":
        return ByteTokenizer().to_dict()
    if kind == "tiktoken":
        return {"name": "tiktoken", "encoding": arg, "vocab_size": GPT2_VOCAB}
    return {"name": "hf", "path": os.path.abspath(arg), "sha256": file_sha256(arg), "vocab_size": _hf_vocab_size(arg)}


class RecordedTokenizer:
    """A tokenizer known by its record: name and vocabulary size without its files (what a run on
    token ids keeps); loaded on the first encode/decode, or by `load()`, which raises a one-line
    UserError where its files cannot be had (offline tiktoken, no tokenizers package, ...)."""

    def __init__(self, record: dict, search: tuple = ()):
        self.record, self.search, self._tok = dict(record), tuple(search), None
        self.name, self.vocab_size = str(record["name"]), int(record["vocab_size"])

    def load(self):
        if self._tok is None:
            self._tok = _load_record(self.record, self.search)
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self.load().encode(text)

    def decode(self, ids) -> str:
        return self.load().decode(ids)

    def to_dict(self) -> dict:
        return dict(self.record)


def get_tokenizer(name: str):
    """The tokenizer a `--tokenizer` value names, loaded: byte, tiktoken:gpt2 (gpt2, tiktoken) or a
    tokenizer.json path. `word` is refused: dba has no word tokenizer for text."""
    kind, arg = parse_tokenizer(name)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(arg)
    if kind == "hf":
        return HFTokenizer(arg)
    raise UserError(WORD_REFUSED)


def _load_record(d: dict, search: tuple) -> object:
    if d["name"] == "byte":
        return ByteTokenizer()
    if d["name"] == "tiktoken":
        return TiktokenTokenizer(d.get("encoding", "gpt2"))
    # hf: the recorded path, else a tokenizer.json (or the recorded file name) in a `search` dir
    path = str(d.get("path") or "tokenizer.json")
    candidates = [path] + [os.path.join(str(s), n) for s in search
                           for n in dict.fromkeys(("tokenizer.json", os.path.basename(path)))]
    wrong = None
    for c in candidates:
        if os.path.isfile(c):
            if d.get("sha256") and file_sha256(c) != d["sha256"]:
                wrong = wrong or c
                continue
            return HFTokenizer(c)
    if wrong:
        raise UserError(f"tokenizer.json {wrong} differs from the one the run recorded (sha256 "
                        f"{str(d['sha256'])[:12]}...)", 1)
    raise UserError(f"the recorded tokenizer {path} is not on this machine (nor a tokenizer.json next to the "
                    f"checkpoint)", 1)


def tokenizer_from_dict(d: dict, *, lazy: bool = False, search: tuple = ()):
    """Inverse of `to_dict()` (what run directories and checkpoints record). `lazy`: a
    RecordedTokenizer that loads on first use (byte is always loaded: it needs nothing).
    `search`: directories where a recorded tokenizer.json may also be found (the checkpoint's)."""
    if not isinstance(d, dict) or "name" not in d:
        raise UserError(f"bad tokenizer record {d!r}: expected a dict with a 'name'")
    if d["name"] not in ("byte", "tiktoken", "hf"):
        raise UserError(f"unknown tokenizer {d['name']!r} in the record {d!r}")
    if lazy and d["name"] != "byte" and isinstance(d.get("vocab_size"), int):
        return RecordedTokenizer(d, search)
    return _load_record(d, search)


def decode_ids(tok, ids) -> str:
    """`tok.decode(ids)`, with ids outside the tokenizer's vocabulary (a padded model vocabulary
    can sample them) shown as `<|id|>` instead of failing."""
    out, run = [], []
    for i in map(int, ids):
        if 0 <= i < tok.vocab_size:
            run.append(i)
            continue
        if run:
            out.append(tok.decode(run))
            run = []
        out.append(f"<|{i}|>")
    if run:
        out.append(tok.decode(run))
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Token files
# --------------------------------------------------------------------------------------------


def default_corpus_text() -> str:
    """CPython's bundled reference docs: a few hundred KB of English shipped with every Python,
    so training runs out of the box with no download. Topics are joined in sorted-key order
    (deterministic across runs) with a blank line between them."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _token_array(ids, vocab_size: int) -> np.ndarray:
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    return np.asarray(ids, dtype=dtype)


def _check_ids(tokens: np.ndarray, vocab_size: int | None, where: str) -> int:
    """Reject negative ids and ids >= vocab_size; return the vocab size (given or max id + 1)."""
    if tokens.size == 0:
        raise UserError(f"{where}: no tokens")
    if tokens.dtype.kind == "i":
        i_min = int(np.argmin(tokens))
        if int(tokens[i_min]) < 0:
            raise UserError(f"{where}: negative token id {int(tokens[i_min])} at index {i_min}")
    i_max = int(np.argmax(tokens))
    largest = int(tokens[i_max])
    if vocab_size is None:
        return largest + 1
    if largest >= vocab_size:
        raise UserError(
            f"{where}: token id {largest} at index {i_max} is out of range for vocab_size "
            f"{vocab_size} (largest id must be < vocab_size)"
        )
    return int(vocab_size)


_SNIFF_BYTES = 1 << 16
_IDS_TEXT = re.compile(rb"[\s\d]*\d[\s\d]*")


def _text_holds_ids(path: str) -> bool:
    """A text file whose first 64 KiB are only ASCII digits and whitespace holds token ids."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})", code=1) from None
    return _IDS_TEXT.fullmatch(head) is not None


def resolve_format(path: str, data_format: str) -> str:
    """The format a token file is read in: `data_format`, or for `auto` the one its name (and,
    for a .txt/.text file, its content) says."""
    if data_format not in DATA_FORMATS:
        raise UserError(f"unknown data format {data_format!r}; choose one of: {', '.join(DATA_FORMATS)}")
    if data_format != "auto":
        return data_format
    ext = os.path.splitext(path)[1].lower()
    if ext in (".npy", ".bin"):
        return ext[1:]
    if ext in (".pt", ".pth"):
        return "pt"
    if ext in (".txt", ".text"):
        return "text" if _text_holds_ids(path) else "utf8"
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            return "npy"
    raise UserError(
        f"{path}: cannot tell the data format from the name; pass --data-format npy, bin, pt, text (integer ids) "
        f"or utf8 (text to tokenize)"
    )


def describe_data(path: str | None, data_format: str, tokenizer) -> str | None:
    """One line on how a token file is read, where it is not evident from the flags: a .txt
    whose format `auto` sniffed, and token ids whose named tokenizer is only recorded. None
    otherwise, and when the file cannot be read (load_tokens says why)."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        side = prepared.read_sidecar(path) if resolve_format(os.fspath(path), data_format) == "npy" else None
    except (UserError, OSError):
        side = None
    if side is not None:
        return f"{path} {_describe_prepared(path, side)}"
    if isinstance(tokenizer, str) and tokenizer.strip().lower() == "word":
        tokenizer = "word"
    try:
        fmt = resolve_format(os.fspath(path), data_format)
    except (UserError, OSError):
        return None
    notes = []
    if fmt == "utf8" and tokenizer == "word":
        return None  # refused when the file is read
    if data_format == "auto" and os.path.splitext(path)[1].lower() in (".txt", ".text"):
        notes.append("holds whitespace-separated integer token ids: read as ids (--data-format text)" if fmt == "text"
                     else f"holds text: tokenized with {tokenizer or 'byte'} (--data-format utf8)")
    elif fmt in ID_FORMATS and tokenizer not in (None, "word"):
        notes.append("holds token ids")
    if fmt in ID_FORMATS and isinstance(tokenizer, str) and tokenizer != "word":
        try:
            label = tokenizer_label(tokenizer_record(tokenizer))
        except UserError:
            label = None
        if label:
            notes.append(f"tokenizer {label} recorded for `dba sample --prompt` (not needed to train on ids)")
    return f"{path} " + "; ".join(notes) if notes else None


def _describe_prepared(path: str, side: dict) -> str:
    text = (f"prepared by dba prepare ({os.path.basename(prepared.sidecar_path(path))}): tokenizer "
            f"{tokenizer_label(side['tokenizer'])}, vocab {int(side['vocab_size']):,}, {int(side['tokens']):,} tokens")
    val = side.get("val")
    if val:
        text += (f"; validation: {val['file']} ({int(val['tokens']):,} tokens held out by {val['by']}; "
                 f"--val-frac unused)")
    return text


def _one_line(e: BaseException) -> str:
    """`TypeName: message` on one line (numpy's messages may quote a header with newlines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _load_npy(path: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - a damaged header raises ValueError, EOFError, OSError,
        # but also tokenize.TokenError, TypeError ("'<' not supported between bytes and str"), ...
        raise UserError(f"{path}: not a readable .npy file ({_one_line(e)})", code=1) from None
    if arr.dtype.name not in TOKEN_DTYPES:
        raise UserError(
            f"{path}: token dtype {arr.dtype.name} is not supported; expected one of "
            f"{', '.join(TOKEN_DTYPES)}"
        )
    # Some pipelines save (n_docs, T) blocks; the stream is the row-major flattening.
    return arr if arr.ndim == 1 else arr.reshape(-1)


def _load_bin(path: str, data_dtype: str) -> np.ndarray:
    if data_dtype not in TOKEN_DTYPES:
        raise UserError(f"data dtype {data_dtype!r} is not supported; choose one of: {', '.join(TOKEN_DTYPES)}")
    itemsize = np.dtype(data_dtype).itemsize
    size = os.path.getsize(path)
    if size % itemsize:
        raise UserError(
            f"{path}: size {size} bytes is not a multiple of {itemsize} (data dtype {data_dtype}); "
            f"wrong --data-dtype?"
        )
    try:
        return np.memmap(path, dtype=data_dtype, mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: cannot memory-map ({_one_line(e)})", code=1) from None


_INT_ID = re.compile(r"[+-]?\d+")


def _load_text_ids(path: str) -> np.ndarray:
    """v29's `--data-format text`: whitespace-separated integer token ids."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # numpy < 2 warns where 2.x raises
            ids = np.fromfile(path, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
        raise UserError(_bad_id_text(path)) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})", code=1) from None
    if ids.size == 0:
        raise UserError(f"{path}: no token ids (--data-format text is whitespace-separated integer ids)")
    largest = int(ids.max())
    if largest > np.iinfo(np.int32).max:
        raise UserError(f"{path}: token id {largest} at index {int(np.argmax(ids))} is too large "
                        f"(largest usable id {np.iinfo(np.int32).max})")
    if int(ids.min()) >= 0:
        ids = ids.astype(np.uint16 if largest < 1 << 16 else np.int32)
    return ids


def _bad_id_text(path: str) -> str:
    """The one-line error for a `--data-format text` file that is not all integers: where."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                bad = next((w for w in line.split() if not _INT_ID.fullmatch(w)), None)
                if bad is not None:
                    word = bad if len(bad) <= 20 else bad[:20] + "..."
                    return (f"{path}: line {n}: {word!r} is not an integer token id; --data-format text is v29's "
                            f"whitespace-separated ids (text to tokenize: --data-format utf8)")
    except OSError as e:
        return f"{path}: cannot read ({e.strerror})"
    return f"{path}: not whitespace-separated integer token ids"


def _load_pt(path: str) -> np.ndarray:
    """v29's `--data-format pt`: a `torch.save`d integer tensor (read without torch)."""
    from dba.torchfile import read_pt

    obj = read_pt(path)
    if not isinstance(obj, np.ndarray):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a tensor; --data-format pt is a torch.save'd "
                        f"1-D integer tensor of token ids")
    if obj.dtype.kind not in "iu" or obj.dtype == np.bool_:
        raise UserError(f"{path}: the tensor is {obj.dtype.name}, not integer token ids")
    tokens = obj.reshape(-1)
    if tokens.dtype.name not in TOKEN_DTYPES:  # int8/int16/uint8: widen to one we sample from
        tokens = tokens.astype(np.int32 if tokens.dtype.kind == "i" else np.uint16)
    return tokens


def load_tokens(
    path: str | None,
    *,
    data_format: str = "auto",
    data_dtype: str = "uint16",
    tokenizer=None,
    vocab_size: int | None = None,
):
    """Load a token stream. Returns (tokens 1-D ndarray, vocab_size, tokenizer or None).

    path None: the default corpus (`default_corpus_text()`) through `tokenizer` (byte by default).
    Token-id files (npy: memory-mapped, dtype from the header; bin: raw memmap of `data_dtype`;
    pt: a torch.save'd tensor; text: whitespace-separated ids): with a tokenizer named
    (`--tokenizer`, not `word`) its record is returned (a RecordedTokenizer, not loaded) so the
    run can record it, and every id must be in its vocabulary; else None. utf8 text: tokenized
    with `tokenizer` (byte by default). vocab_size: as given, else the tokenizer's, else max id + 1.
    `tokenizer` is a `--tokenizer` value, None, or a tokenizer object (used as is).
    """
    if vocab_size is not None and int(vocab_size) <= 0:
        raise UserError(f"vocab_size must be positive, got {vocab_size}")
    if path is None:
        return _tokenize(default_corpus_text(), _text_tokenizer(tokenizer), vocab_size,
                         "default corpus (pydoc_data.topics)")

    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"data path is a directory, expected a file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"data file is not readable: {path}", code=1)
    if os.path.getsize(path) == 0:
        raise UserError(f"data file is empty: {path}")

    fmt = resolve_format(path, data_format)
    if fmt == "npy":
        side = prepared.read_sidecar(path)
        if side is not None:
            return _load_prepared(path, side, tokenizer, vocab_size)
    if fmt == "utf8":
        tok = _text_tokenizer(tokenizer)
        if tok.name == "byte":
            # Bytes on disk are the byte tokenizer's ids; reading them raw also accepts non-UTF-8.
            try:
                ids = np.fromfile(path, dtype=np.uint8).astype(np.uint16)
            except OSError as e:
                raise UserError(f"{path}: cannot read ({e.strerror})", code=1) from None
            vs = _check_ids(ids, ByteTokenizer.vocab_size if vocab_size is None else vocab_size, path)
            return ids, vs, tok
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})", code=1) from None
        return _tokenize(text, tok, vocab_size, path)

    if fmt == "text":
        tokens = _load_text_ids(path)
    elif fmt == "pt":
        tokens = _load_pt(path)
    else:
        tokens = _load_npy(path) if fmt == "npy" else _load_bin(path, data_dtype)
    if tokens.size == 0:
        raise UserError(f"data file holds no tokens: {path}")
    tok = _id_tokenizer(tokenizer)
    if tok is None or not isinstance(tokenizer, str):  # none, or a caller's object (a checkpoint's)
        return tokens, _check_ids(tokens, vocab_size, path), tok
    top = _check_ids(tokens, None, path) - 1
    if top >= tok.vocab_size:
        raise UserError(f"{path}: token id {top} at index {int(np.argmax(tokens))} is outside the vocabulary of "
                        f"tokenizer {tokenizer_label(tok.to_dict())} ({tok.vocab_size} ids): these ids were not "
                        f"made by it")
    return tokens, _check_ids(tokens, tok.vocab_size if vocab_size is None else vocab_size, path), tok


def _load_prepared(path: str, side: dict, tokenizer, vocab_size):
    """A `dba prepare` output: the tokenizer and vocabulary its sidecar records (dba/prepared.py).
    An explicit `--tokenizer` must name the same tokenizer; ids are trusted to be < the recorded
    vocabulary (dba prepare made them so), and checked only against a smaller `vocab_size`."""
    tokens = _load_npy(path)
    prepared.check_tokens(path, side, tokens)
    record = prepared.tokenizer_record(path, side)
    if isinstance(tokenizer, str) and parse_tokenizer(tokenizer)[0] != "word":
        given = tokenizer_record(tokenizer)
        same = given["name"] == record.get("name") and (
            given["name"] == "byte" or (given["name"] == "tiktoken" and given.get("encoding") == record.get("encoding"))
            or (given["name"] == "hf" and given.get("sha256") == record.get("sha256")))
        if not same:
            raise UserError(f"--tokenizer {tokenizer}: {path} was prepared with {tokenizer_label(record)} (its sidecar "
                            f"{prepared.sidecar_path(path)}); drop --tokenizer")
    if tokenizer is None or isinstance(tokenizer, str):
        tok = ByteTokenizer() if record["name"] == "byte" else RecordedTokenizer(record)
    else:
        tok = tokenizer  # a caller's object (a checkpoint's tokenizer)
    vocab = int(side["vocab_size"])
    if vocab_size is not None and int(vocab_size) < vocab:
        _check_ids(tokens, int(vocab_size), path)
    return tokens, (vocab if vocab_size is None else int(vocab_size)), tok


def train_val(path: str | None, tokens: np.ndarray, val_frac: float):
    """(train, val): a prepared file's held-out split when its sidecar names one (all of `tokens`
    trains), else the tail `val_frac` of the stream (v29)."""
    path = None if path is None else os.fspath(path)
    val = prepared.held_out_tokens(path, prepared.read_sidecar(path)) if path else None
    if val is None:
        return split_train_val(tokens, val_frac)
    return tokens, val


def _text_tokenizer(tokenizer):
    """The tokenizer text is read with: a `--tokenizer` value (None = byte) loaded, or an object."""
    if tokenizer is None or isinstance(tokenizer, str):
        return get_tokenizer(tokenizer or "byte")
    return tokenizer


def _id_tokenizer(tokenizer):
    """The tokenizer kept with token-id data: None for none/word, a record for a name (not loaded:
    training on ids needs no tokenizer files), an object as is."""
    if tokenizer is None or not isinstance(tokenizer, str):
        return tokenizer
    record = tokenizer_record(tokenizer)
    if record is None:
        return None
    return ByteTokenizer() if record["name"] == "byte" else RecordedTokenizer(record)


def _tokenize(text: str, tok, vocab_size, where: str):
    if not text:
        raise UserError(f"{where}: empty text")
    vs = tok.vocab_size if vocab_size is None else int(vocab_size)
    ids = _token_array(tok.encode(text), max(vs, tok.vocab_size))
    vs = _check_ids(ids, vs, where)
    return ids, vs, tok


# --------------------------------------------------------------------------------------------
# Split and sampling
# --------------------------------------------------------------------------------------------


def split_train_val(tokens: np.ndarray, val_frac: float):
    """Hold out the last `val_frac` of the stream for validation (v29). Returns views, no copy."""
    if not 0.0 < float(val_frac) < 1.0:
        raise UserError(f"val_frac must be in (0, 1), got {val_frac}")
    n = len(tokens)
    split = int(n * (1.0 - float(val_frac)))
    train, val = tokens[:split], tokens[split:]
    # One (x, y) pair needs two tokens; check_enough applies the real seq_len requirement.
    if len(train) < 2 or len(val) < 2:
        raise UserError(
            f"{n} tokens split with val_frac {val_frac} gives train {len(train)} / val {len(val)} "
            f"tokens; each needs at least 2"
        )
    return train, val


def check_enough(tokens: np.ndarray, seq_len: int, what: str = "data") -> None:
    """A window needs seq_len inputs plus one shifted target."""
    if int(seq_len) < 1:
        raise UserError(f"sequence length must be a positive integer, got {seq_len}")
    if len(tokens) < int(seq_len) + 1:
        raise UserError(
            f"{what} has {len(tokens)} tokens, fewer than seq_len + 1 = {int(seq_len) + 1}; "
            f"use a shorter sequence length or more data"
        )


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, stream: int = 0,
                 rows: slice | None = None):
    """(x, y) int32 (B, T) windows at uniform offsets in [0, len - seq_len - 1].

    The generator is keyed by (seed, stream, step) so a resumed run draws the same batches as an
    uninterrupted one; `stream` separates independent consumers (train vs. eval, micro-batches).
    `rows` selects some rows of that batch (a host's share under multi-host training): all
    offsets are drawn, so the rows are the same whoever reads them, but only these are read.
    """
    check_enough(tokens, seq_len)
    if int(batch_size) < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size}")
    if min(int(seed), int(stream), int(step)) < 0:  # numpy's SeedSequence takes no negative entropy
        raise UserError(f"the data seed must be a non-negative integer, got seed {seed} "
                        f"(stream {stream}, step {step})")
    rng = np.random.default_rng([int(seed), int(stream), int(step)])
    offsets = rng.integers(0, len(tokens) - seq_len, size=int(batch_size))  # high is exclusive
    if rows is not None:
        offsets = offsets[rows]
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    window = np.asarray(tokens[idx])  # one gather; memmap reads only these pages
    if window.dtype != np.int32 and window.dtype.itemsize >= 4 and window.size:
        # uint32 / int64 ids >= 2**31 would wrap to negative int32 ids silently; check the
        # gathered window only (B * (T + 1) values, not the whole stream).
        i32 = np.iinfo(np.int32)
        hi, lo = int(window.max()), int(window.min())
        if hi > i32.max or lo < i32.min:
            bad = hi if hi > i32.max else lo
            row, col = np.argwhere(window == bad)[0]
            raise UserError(f"token id {bad} at index {int(offsets[row]) + int(col)} does not fit the "
                            f"int32 batches the model reads (largest usable id {i32.max})")
    window = window.astype(np.int32, copy=False)
    return np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])
