"""`dba prepare --corpus python-stdlib`: a corpus every Python ships, its standard library's .py
sources (docstrings and comments included), one document per file.

Deterministic for a Python version: the files are taken in sorted relative-path order. Left out:
the test suites (any directory named test, tests or idle_test: Lib/test, lib2to3/tests,
idlelib/idle_test, ...), third-party packages (site-packages, dist-packages) and __pycache__.
The held-out split is by file: a file is validation when the first 8 bytes of the sha256 of its
relative path, read as a fraction of 2**64, fall below --val-frac, so a file's side does not
depend on which other files a Python version has.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig

NAME = "python-stdlib"
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
DEFAULT_VAL_FRAC = 0.02


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
    """(path, relative path) of the corpus's files, sorted by relative path."""
    root = root or stdlib_root()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in EXCLUDED_DIRS]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(d, name)
                out.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    return sorted(out, key=lambda x: x[1])


def held_out(rel: str, val_frac: float) -> bool:
    """Whether the file at relative path `rel` is in the validation split."""
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")
    return h < val_frac * 2.0**64


def python_record() -> dict:
    """What the corpus depends on: the Python that ran, and where its library is."""
    return {"version": platform.python_version(), "implementation": platform.python_implementation(),
            "build": " ".join(sys.version.split()), "stdlib": stdlib_root()}
