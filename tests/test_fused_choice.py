"""`--kv-fused` resolution (dba/fused.py): which kernel a backend and device get."""

from __future__ import annotations

import pytest

from dba.errors import UserError
from dba.fused import resolve_fused


@pytest.mark.parametrize("choice,backend,on_gpu,want", [
    ("auto", "jax", True, ("pallas", False)),
    ("auto", "jax", False, ("none", False)),
    ("auto", "torch", True, ("triton", False)),
    ("auto", "torch", False, ("none", False)),
    ("none", "torch", True, ("none", False)),
    ("pallas", "jax", False, ("pallas", True)),  # explicit on a CPU: the interpreter
    ("triton2pass", "torch", False, ("triton2pass", True)),
    ("triton1pass", "torch", True, ("triton1pass", False)),
])
def test_resolve(choice, backend, on_gpu, want):
    assert resolve_fused(choice, backend, on_gpu) == want


@pytest.mark.parametrize("choice,backend,needle", [
    ("triton", "jax", "torch backend's kernel"),
    ("pallas", "torch", "jax backend's kernel"),
    ("cuda", "torch", "--kv-fused 'cuda'"),
])
def test_mistakes(choice, backend, needle):
    with pytest.raises(UserError, match=needle):
        resolve_fused(choice, backend, True)
