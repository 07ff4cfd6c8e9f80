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

Every test starts from fixed random states: the global generators (numpy's legacy one, `random`,
torch's) are seeded per test from the test's id, so a test that draws from them draws the same
numbers every run whatever ran before it on its worker; hypothesis runs derandomized (the same
examples every run). A failing test's report has a `seeds` section: that per-test seed and every
explicit seed the test passed to np.random.default_rng, torch.manual_seed or jax.random.key.

No test skips where it can run: a skip whose reason does not start with "hardware:" (a GPU-, Mac-
or Linux-only test on another machine) fails the session, after the summary lists it (`-ra`
prints every skip's reason). A missing fixture, package or file is then a failure, not a quiet
pass.

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
import random
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest


def pytest_configure(config):
    import platform

    # h5py's import asks platform for the processor, which runs `uname -p` in a child process the
    # first time: asked here, before the guard, so a fast test that first imports h5py passes alone
    platform.processor()
    _guard_processes()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach for the hub here
    _record_seeds(np.random, "default_rng")
    try:
        from hypothesis import settings

        settings.register_profile("dba", derandomize=True, print_blob=True)
        settings.load_profile("dba")
    except ImportError:  # hypothesis is in the dev extra
        pass
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


# The longest files first (seconds summed over their tests, measured with `--durations=0` on the
# 2-core machine): `-n 2` hands whole files to the workers in collection order (`--dist loadfile`),
# so a long file collected last would run alone at the end while the other worker idles.
LONGEST_FILES = ("tests/test_train.py", "parity_tests/test_decode_parity.py", "parity_tests/test_model_parity.py",
                 "parity_tests/test_rotated_keys.py", "tests/test_distill.py", "tests/test_faults.py",
                 "tests/test_mesh.py", "tests/test_self_opt.py", "tests/test_torch_train.py", "tests/test_eval.py",
                 "tests/test_cli_mistakes.py", "tests/test_analysis.py", "tests/test_bench.py")


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: order within kept


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


# ---- fixed seeds, printed with a failure -------------------------------------------------------
_SEEDS: list = []  # (where, seed) passed explicitly during the current test


def _record_seeds(owner, name: str) -> None:
    """Wrap `owner.name` (a seeding function) so the integer seeds it is given are recorded."""
    plain = getattr(owner, name)
    if getattr(plain, "_dba_records", False):
        return

    def recording(seed=None, *args, **kwargs):
        if isinstance(seed, (int, np.integer)) or (isinstance(seed, (list, tuple)) and seed
                                                   and all(isinstance(s, (int, np.integer)) for s in seed)):
            _SEEDS.append((f"{getattr(owner, '__name__', owner)}.{name}", seed))
        return plain(seed, *args, **kwargs)

    recording._dba_records = True
    setattr(owner, name, recording)


@pytest.fixture(autouse=True)
def _fixed_seeds(request):
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)
        _record_seeds(torch, "manual_seed")
    if "jax" in sys.modules:
        import jax

        _record_seeds(jax.random, "key")
        _record_seeds(jax.random, "PRNGKey")
    request.node.dba_seed = seed
    _SEEDS.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and hasattr(item, "dba_seed"):
        explicit = ", ".join(dict.fromkeys(f"{where}({seed!r})" for where, seed in _SEEDS)) or "none"
        report.sections.append(("seeds", f"global generators (numpy, random, torch) seeded with {item.dba_seed} "
                                         f"(crc32 of the test id); explicit seeds: {explicit}"))


# ---- no quiet skips ------------------------------------------------------------------------------
HARDWARE = "hardware:"  # the reason prefix of a skip this machine cannot avoid (tests.support.hardware_skip)
_SKIPPED: list = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(HARDWARE):
            _SKIPPED.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _SKIPPED:
        terminalreporter.section("skips that are failures", sep="=", red=True, bold=True)
        for nodeid, reason in _SKIPPED:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(f"{len(_SKIPPED)} test(s) skipped on a machine that can run them: only reasons "
                              f"starting with {HARDWARE!r} may skip")


def pytest_sessionfinish(session, exitstatus):
    if _SKIPPED and exitstatus == 0 and not hasattr(session.config, "workerinput"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
