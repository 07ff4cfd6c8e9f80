"""A 1-D .npy file written in pieces whose total length is known only at the end, and files that
appear under their final names only when complete.

The .npy header is written first with room for any length (a fixed 128-byte header, padded with
spaces as the format allows), the data is appended as it comes, and the header is rewritten with
the real length at the end: memory stays at one piece, and `np.load(mmap_mode="r")` reads the
result like any `np.save`d array. Everything is written to a hidden temporary name in the target
directory and renamed over the final name only by `Staged.commit`; `Staged.discard` (also run by
the context manager on any exception, Ctrl-C included) removes every temporary, so a failed or
interrupted write leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0: a 2-byte header length
_HEADER_BYTES = 128  # magic + length + dict text; a multiple of 64 as numpy aligns it


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _header(dtype: np.dtype, length: int) -> bytes:
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({int(length)},), }}"
    pad = _HEADER_BYTES - len(_MAGIC) - 2 - len(text) - 1
    if pad < 0:
        raise ValueError(f"an .npy header for {length} {dtype} values does not fit {_HEADER_BYTES} bytes")
    body = (text + " " * pad + "\n").encode("latin1")
    return _MAGIC + len(body).to_bytes(2, "little") + body


class Staged:
    """Temporary files beside their final names, renamed into place together by `commit`."""

    def __init__(self):
        self._files: list[tuple[str, str]] = []  # (temporary, final)

    def path(self, final: str) -> str:
        """A new hidden temporary file in `final`'s directory (created empty)."""
        d, name = os.path.split(os.path.abspath(final))
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the result is an ordinary file
        self._files.append((tmp, final))
        return tmp

    def commit(self) -> None:
        """Rename every temporary over its final name, in the order they were made (so the file
        that describes the others goes last)."""
        for tmp, final in self._files:
            os.replace(tmp, final)
        self._files = []

    def drop(self, final: str) -> None:
        """Remove the temporary meant for `final`: that file is not written after all."""
        for tmp, target in list(self._files):
            if target == final:
                os.unlink(tmp)
                self._files.remove((tmp, target))

    def discard(self) -> None:
        for tmp, _ in self._files:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        self._files = []

    def __enter__(self) -> "Staged":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after a commit nothing is left to discard


class NpyStream:
    """Appends 1-D arrays of one dtype to an .npy file; `close()` writes the final length."""

    def __init__(self, path: str, dtype):
        self.path, self.dtype, self.length = path, np.dtype(dtype).newbyteorder("<"), 0
        self._f = open(path, "wb")
        self._f.write(_header(self.dtype, 0))

    def write(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.size:
            self._f.write(values.astype(self.dtype, copy=False).tobytes())
            self.length += int(values.size)

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.seek(0)
        self._f.write(_header(self.dtype, self.length))
        self._f.close()

    def abort(self) -> None:
        self._f.close()
