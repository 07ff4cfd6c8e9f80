"""Token data: tokenizers, token files (.npy / raw .bin / text), train/val split, batch sampling.

numpy only (no jax, no torch): both the JAX trainer and the PyTorch reference read data here.
Binary token files are memory-mapped so a 100M-token corpus costs no RAM until sampled.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile

import numpy as np

from dba.errors import UserError

# Token dtypes we accept on disk. Unsigned 16-bit is v29's format (GPT-2 ids fit in it).
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
DATA_FORMATS = ("auto", "npy", "bin", "text")
TOKENIZERS = ("byte", "tiktoken", "gpt2")

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


def get_tokenizer(name: str):
    """"byte" | "tiktoken" | "gpt2" (alias of tiktoken's gpt2 encoding)."""
    key = str(name).lower()
    if key == "byte":
        return ByteTokenizer()
    if key in ("tiktoken", "gpt2"):
        return TiktokenTokenizer("gpt2")
    raise UserError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")


def tokenizer_from_dict(d: dict):
    """Inverse of `to_dict()` (what run directories and checkpoints record)."""
    if not isinstance(d, dict) or "name" not in d:
        raise UserError(f"bad tokenizer record {d!r}: expected a dict with a 'name'")
    if d["name"] == "tiktoken":
        return TiktokenTokenizer(d.get("encoding", "gpt2"))
    return get_tokenizer(d["name"])


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


def _resolve_format(path: str, data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise UserError(f"unknown data format {data_format!r}; choose one of: {', '.join(DATA_FORMATS)}")
    if data_format != "auto":
        return data_format
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return "npy"
    if ext == ".bin":
        return "bin"
    if ext in (".txt", ".text"):
        return "text"
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            return "npy"
    raise UserError(
        f"{path}: cannot tell the data format from the name; pass data format npy, bin or text"
    )


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


def load_tokens(
    path: str | None,
    *,
    data_format: str = "auto",
    data_dtype: str = "uint16",
    tokenizer="byte",
    vocab_size: int | None = None,
):
    """Load a token stream. Returns (tokens 1-D ndarray, vocab_size, tokenizer or None).

    path None: the default corpus (`default_corpus_text()`) through `tokenizer` (byte by default).
    .npy: memory-mapped, dtype from the header. .bin: raw memmap of `data_dtype`. Text
    (.txt or data_format="text"): tokenized with `tokenizer`. Binary files carry no tokenizer,
    so None is returned for them. vocab_size: as given, else the tokenizer's, else max id + 1.
    """
    if vocab_size is not None and int(vocab_size) <= 0:
        raise UserError(f"vocab_size must be positive, got {vocab_size}")
    if path is None:
        tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        return _tokenize(default_corpus_text(), tok, vocab_size, "default corpus (pydoc_data.topics)")

    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"data path is a directory, expected a file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"data file is not readable: {path}", code=1)
    if os.path.getsize(path) == 0:
        raise UserError(f"data file is empty: {path}")

    fmt = _resolve_format(path, data_format)
    if fmt == "text":
        tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
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

    tokens = _load_npy(path) if fmt == "npy" else _load_bin(path, data_dtype)
    if tokens.size == 0:
        raise UserError(f"data file holds no tokens: {path}")
    vs = _check_ids(tokens, vocab_size, path)
    return tokens, vs, None


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
