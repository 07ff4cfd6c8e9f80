"""Fixtures shared by the test modules that run `dba train` on a toy stream."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """A learnable toy stream of uint16 ids, vocab 97, saved as .npy (read-only for tests)."""
    rng = np.random.default_rng(0)
    base = np.arange(20_000) * 7 % 97
    toks = np.where(rng.random(20_000) < 0.2, rng.integers(0, 97, 20_000), base).astype(np.uint16)
    path = tmp_path_factory.mktemp("data") / "toy.npy"
    np.save(path, toks)
    return path
