"""The run's token data and the batches it draws (host side, numpy).

Batches come from `dba.data.sample_batch` keyed by (seed, step, stream): micro-batch i of an
accumulated step uses stream i, evaluation uses its own streams with fixed batches per eval
index, so a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dba import prepared
from dba.data import check_enough, load_tokens, sample_batch, split_train_val, train_val
from train.config import DataConfig

EVAL_VAL_STREAM = 1_000_003
EVAL_TRAIN_STREAM = 1_000_033


@dataclass(frozen=True)
class RunData:
    """The token stream, its train/validation split, vocabulary size and tokenizer (or None)."""

    tokens: np.ndarray
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: Any

    @classmethod
    def load(cls, data: DataConfig) -> "RunData":
        """The data; a `dba prepare` output brings its vocabulary, tokenizer and held-out split
        (dba/prepared.py): an explicit --vocab-size or --tokenizer must agree with them."""
        side = prepared.read_sidecar(data.path) if data.format in ("auto", "npy") else None
        if side is not None:
            prepared.check_vocab(data.path, side, data.vocab_size)
        tokens, vocab, tok = load_tokens(data.path, data_format=data.format, data_dtype=data.dtype,
                                         tokenizer=data.tokenizer, vocab_size=data.vocab_size)
        train, val = train_val(data.path, tokens, data.val_frac) if side is not None else \
            split_train_val(tokens, data.val_frac)
        return cls(tokens, train, val, int(vocab), tok)

    def check_lengths(self, train_len: int, eval_len: int) -> None:
        """Each split holds at least one window of the longest length it is read at."""
        check_enough(self.train, train_len, "the train split")
        check_enough(self.val, eval_len, "the validation split")

    def record(self, path: str | None) -> dict[str, Any]:
        """The `data` field of the meta event."""
        return {"path": path or "default corpus (pydoc_data.topics)", "tokens": int(len(self.tokens)),
                "train_tokens": int(len(self.train)), "val_tokens": int(len(self.val)),
                "vocab_size": int(self.vocab_size),
                "tokenizer": self.tokenizer.to_dict() if self.tokenizer is not None else None}


def train_batch(tokens: np.ndarray, *, batch_size: int, grad_accum: int, seed: int, seq_len: int, step: int,
                rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int32 (A, B, T): the grad_accum micro-batches of optimizer step `step` (only the
    batch rows `rows` when given: this host's share of the global batch)."""
    pairs = [sample_batch(tokens, batch_size, seq_len, seed, step, stream=i, rows=rows) for i in range(grad_accum)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def eval_batches(tokens: np.ndarray, *, batch_size: int, iters: int, seed: int, seq_len: int, stream: int,
                 rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y) int32 (N, B, T): batch i is fixed by (seed, i), the same at every evaluation."""
    pairs = [sample_batch(tokens, batch_size, seq_len, seed, i, stream=stream, rows=rows) for i in range(iters)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
