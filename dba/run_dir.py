"""A run directory: the files that make it hold a run, removing them for `--overwrite`, and the
lock that keeps a second training process out of it.

The lock is an OS-level exclusive `flock` on `<run>/.dba.lock`, held from before the trainer
looks at the directory until it exits. The OS drops it with the process, however it ends (a
SIGKILLed run leaves no stale lock, and `--resume` then proceeds). A second trainer on a locked
directory stops at once with one line naming the directory and the holder's pid, having written
nothing there. Readers (`dba report`, `dba sample`, `dba eval`) never take it. Framework-free, so
the JAX and the torch trainers share it; in a multi-host run only the writer process (process 0)
takes it. `flock` is advisory and per host: on a network filesystem two hosts may both get it.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dba.errors import UserError

RUN_FILES = ("train.jsonl", "summary.md", "best.safetensors", "last.safetensors")
LOCK_NAME = ".dba.lock"


def holds_run(out_dir: str | Path) -> bool:
    out_dir = Path(out_dir)
    return out_dir.is_dir() and (any((out_dir / n).exists() for n in RUN_FILES) or (out_dir / "checkpoints").exists())


def clear_run(out_dir: str | Path) -> None:
    """--overwrite: remove our files only (never the directory itself or anything else in it)."""
    out_dir = Path(out_dir)
    for n in RUN_FILES:
        for p in (out_dir / n, out_dir / f"{n}.tmp"):  # .tmp: a write cut short by a kill
            if p.exists():
                p.unlink()
    if (out_dir / "checkpoints").is_dir():
        shutil.rmtree(out_dir / "checkpoints")


class RunDirLock:
    """`acquire()` takes the directory's lock (creating the directory if needed), a UserError
    (exit 1) when another process holds it; `release()` drops it. The lock file stays (removing
    it would let two processes lock two different files), except that `release(discard=True)`
    removes the directory (and the parents acquire() made) again when this lock created it and it
    holds nothing but the lock file."""

    def __init__(self, out_dir: str | Path, *, new_name: bool = False):
        """`new_name`: `out_dir` is a generated name (a timestamp) that must not be shared: take
        the first of out_dir, out_dir-2, out_dir-3, ... that does not exist yet (`self.dir`)."""
        self.dir = Path(out_dir)
        self.new_name = new_name
        self._fd: int | None = None
        self._created: list[Path] = []  # directories acquire() made, deepest first

    @property
    def path(self) -> Path:
        return self.dir / LOCK_NAME

    def acquire(self) -> "RunDirLock":
        try:
            self._created = [d for d in self.dir.absolute().parents if not d.exists()]
            if self.new_name:
                self.dir = _claim_new_dir(self.dir)
                self._created.insert(0, self.dir)
            else:
                if not self.dir.exists():
                    self._created.insert(0, self.dir)
                self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use run directory {str(self.dir)!r}: {os.strerror(e.errno or errno.EIO)}", 1) from None
        self._flock_or_refuse(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _flock_or_refuse(self, fd: int) -> None:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock run directory {str(self.dir)!r}: {os.strerror(e.errno)}", 1) from None
            who = f"pid {holder}" if holder else "another process"
            raise UserError(f"run directory {str(self.dir)!r} is in use by another `dba train` ({who}); wait for it "
                            f"to finish, or choose another --out-dir/--run-tag", 1) from None

    def check_free(self) -> None:
        """Refuse (as `acquire` would) when another process holds the lock, creating and writing
        nothing: lets a trainer stop before it reads or plans anything."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:  # no lock file (or no directory): nobody holds it
            return
        self._flock_or_refuse(fd)
        os.close(fd)  # drops the probe's lock again

    def release(self, discard: bool = False) -> None:
        if self._fd is None:
            return
        if discard and self._created and _only_lock(self.dir):  # a run that failed before writing anything
            self.path.unlink(missing_ok=True)
            for d in self._created:  # leaves no directory behind either
                try:
                    d.rmdir()
                except OSError:
                    break
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _claim_new_dir(base: Path) -> Path:
    """Create and return the first of base, base-2, base-3, ... that did not exist (mkdir is atomic:
    two runs started in the same second get different directories)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        d = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise UserError(f"no free run directory name next to {str(base)!r}; pass --out-dir or --run-tag", 1)


def _only_lock(d: Path) -> bool:
    try:
        return os.listdir(d) == [LOCK_NAME]
    except OSError:
        return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def checkpoint_backend(out_dir: str | Path) -> str | None:
    """'torch' when the run directory's checkpoints hold a `torch_state.pt`, 'jax' when they
    hold an Orbax step directory (`checkpoints/<kind>/<step>/`), None when there is neither.
    Looks at `last` first, then `best`. Imports neither framework."""
    root = Path(out_dir) / "checkpoints"
    for kind in ("last", "best"):
        d = root / kind
        if (d / "torch_state.pt").is_file():
            return "torch"
        try:
            if any(p.is_dir() and p.name.isdigit() for p in d.iterdir()):
                return "jax"
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None
