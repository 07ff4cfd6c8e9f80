"""Writing a `.safetensors` file one tensor at a time (framework-free), so converting a model never
holds more than one of its tensors in memory: the header (names, dtypes, shapes, offsets, and
the metadata) is known before any data, then each tensor's bytes are appended in order. Written
to a temporary name, fsync'd and renamed: an interrupted write leaves nothing half-written.

The format (safetensors' own): an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, padded
with spaces to a multiple of 8), then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from dba.errors import UserError

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def st_dtype(a: np.ndarray) -> str:
    """The safetensors dtype name of a float array (bf16 arrives as ml_dtypes.bfloat16)."""
    name = np.dtype(a.dtype).name
    if name == "bfloat16":
        return "BF16"
    for st, dt in DTYPES.items():
        if np.dtype(a.dtype) == dt:
            return st
    raise ValueError(f"unsupported dtype {name}")


def as_dtype(a: np.ndarray, st: str) -> np.ndarray:
    """`a` in the safetensors dtype `st` (a copy only when it changes)."""
    if st_dtype(a) == st:
        return a
    if st == "BF16":
        import ml_dtypes

        return a.astype(ml_dtypes.bfloat16)
    return a.astype(DTYPES[st])


def write_streamed(path: str | Path, entries: Iterable[tuple[str, str, tuple[int, ...]]],
                   read: Callable[[str], np.ndarray], metadata: Mapping[str, str],
                   on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """Write `path` from `entries` (name, safetensors dtype, shape), fetching each tensor with
    `read(name)` (already in that dtype and shape) only when its turn comes. `on_tensor(name,
    nbytes)` is called after each (progress)."""
    path = Path(path)
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    at = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, dtype, shape in entries:
                a = np.ascontiguousarray(read(name))
                if tuple(a.shape) != tuple(shape) or st_dtype(a) != dtype:
                    raise ValueError(f"{name}: got {st_dtype(a)} {tuple(a.shape)}, the header says {dtype} {tuple(shape)}")
                f.write(memoryview(a.view(np.uint8).reshape(-1)))
                if on_tensor is not None:
                    on_tensor(name, a.nbytes)
                del a
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {str(path)!r}: {os.strerror(e.errno) if e.errno else e}", 1) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
