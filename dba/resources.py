"""Host memory readings (framework-free, cheap: no device sync): this process's resident set
and the memory the host may give it."""

from __future__ import annotations

import os
import resource
import sys


def _proc_status(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process in bytes; None where the OS does not say.

    The peak is the kernel's high-water mark (VmHWM, which `reset_peak_rss` can reset) on Linux,
    else getrusage's maximum."""
    current, peak = _proc_status("VmRSS"), _proc_status("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return current, peak


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_memory_bytes() -> int | None:
    """The memory this host may give the process: physical RAM, capped by a cgroup limit."""
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" / a huge number: no limit
            total = int(text) if total is None else min(total, int(text))
    return total


def platform_text() -> str:
    """`platform.platform()`'s system-release-machine without its processor field: on Linux that
    field runs `uname -p` in a child process the first time, which a training run need not do."""
    import platform

    u = platform.uname()
    return f"{u.system}-{u.release}-{u.machine}"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name", e.g. "AMD EPYC 7B13"), else the machine
    architecture: speeds are only comparable on one CPU, so results name it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine() or "cpu"


def bf16_matrix_units() -> str | None:
    """The CPU's bf16 matrix instructions by their /proc/cpuinfo flag ("amx_bf16": Intel AMX tiles,
    else "avx512_bf16": AVX-512 dot products), or None (no such flag, or no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((u for u in ("amx_bf16", "avx512_bf16") if u in flags), None)
    except OSError:
        pass
    return None
