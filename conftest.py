"""The test suite's JAX compilation cache (this file sits at the repository root so it applies to
`tests/` and `parity_tests/` alike, before any test module imports JAX).

Many tests run `dba train` in a subprocess several times with the same shapes (a straight run,
then resumed legs; fault injection; meshes), and each process would compile the same train and
eval steps again. The session therefore shares one JAX persistent compilation cache (a fresh
directory per session, unless JAX_COMPILATION_CACHE_DIR is already set): every program is still
traced and compiled once per session, later processes load the executable instead.

It also turns LLVM's optimisation of the generated CPU code off (`--xla_backend_optimization_level=0`,
unless XLA_FLAGS already names it). XLA's own HLO passes (fusion, simplification) still run and
floating-point semantics are the same (no fast-math either way); only the machine code is less
tuned. The toy programs here spend far longer compiling than running: this cuts the parity
modules' time by about a third.

The fast tier (`-m "not slow"`, the edit loop) spawns no process: a test that starts one (a `dba`
command end to end, a child interpreter) must be marked `slow`, and an autouse guard fails it
otherwise, naming the mark, so the tier stays fast as tests are added.

And it runs Triton in its CPU interpreter (`TRITON_INTERPRET=1`, unless set): triton reads the
variable once, when it is first imported, and the fused-kernel tests
(tests/test_triton_decode.py) check the kernels on CPU tensors whichever module imports triton
first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest


def pytest_configure(config):
    _guard_processes()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    # Before any test module imports JAX or copies os.environ for its subprocesses (xdist workers
    # inherit the variables from the controller, so they share the directory).
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    cache = tempfile.mkdtemp(prefix="dba-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the toy programs compile fast
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    config._dba_jax_cache = cache


def pytest_unconfigure(config):
    cache = getattr(config, "_dba_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def torch_one_thread():
    """Tiny torch models: one intra-op thread is several times faster than two on a busy 2-core
    machine (use with `pytestmark = pytest.mark.usefixtures("torch_one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_RUNNING: list = [None]  # the test item being set up, run or torn down


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _RUNNING[0] = item  # module fixtures are set up here too: they count for this item


def _guard_processes() -> None:
    """Outside `slow` tests, starting a process is a failure (see the module docstring)."""
    plain = subprocess.Popen.__init__

    def guarded(self, args, *a, **kw):
        item = _RUNNING[0]
        if item is not None and item.get_closest_marker("slow") is None:
            raise AssertionError(f"{item.nodeid} starts a process ({str(args)[:120]}): mark it "
                                 f"@pytest.mark.slow (the fast tier spawns nothing)")
        return plain(self, args, *a, **kw)

    subprocess.Popen.__init__ = guarded
